"""The sftp:// target over OpenSSH's own client (issue #15), against the real sshd on loopback.

What a user relies on: a password or a key's passphrase from the environment works and is never visible to
other processes (not in ssh's arguments or environment); a wrong one is one clear line; host-key checking
stays strict whatever ~/.ssh/config says, and known_hosts is never written; the parallel connections that
export opens all come back after the server restarts; a refused request leaves the connection usable; a
hostile server's replies (a child speaking bogus SFTP on the pipes) are refused, not trusted.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_targets import env, make_config, ssh_server  # noqa: F401 - fixtures

from hotvm.errors import ConfigError, TargetError
from hotvm.formats.export import export_image
from hotvm.formats.repository import Repository
from hotvm.formats.restore import restore_disk
from targets import TargetConfigError, open_target

MiB = 1 << 20


def _password_config(request, tmp_path: Path, monkeypatch, password: str):
    s = request.getfixturevalue("ssh_server")
    monkeypatch.setenv("HOTVM_TEST_SSH_PASSWORD", password)
    made = make_config("sftp", request, tmp_path)
    url = f"sftp://{s.password_user}@127.0.0.1:{s.port}{s.password_dir}/{tmp_path.name}"
    return s, made.config.model_copy(update={"url": url, "key_file": None,
                                             "password_env": "HOTVM_TEST_SSH_PASSWORD"})


def _ssh_children() -> list[int]:
    me = str(os.getpid())
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me \
                    and (entry / "comm").read_text().strip() == "ssh":
                out.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return out


def test_password_from_env_works_and_stays_secret(request, tmp_path: Path, monkeypatch) -> None:
    s, config = _password_config(request, tmp_path, monkeypatch, "s3cret-ssh")
    target = open_target(config)
    try:
        target.write_bytes("a/blob", b"by password")
        assert (s.password_dir / tmp_path.name / "a" / "blob").read_bytes() == b"by password"
        children = _ssh_children()
        assert children, "the session's ssh child is running"
        for pid in children:
            for what in ("cmdline", "environ"):
                assert b"s3cret-ssh" not in Path(f"/proc/{pid}/{what}").read_bytes()
    finally:
        target.close()
    assert _ssh_children() == []  # close() ends every ssh child


def test_wrong_password_is_one_clear_line(request, tmp_path: Path, monkeypatch) -> None:
    _, config = _password_config(request, tmp_path, monkeypatch, "not-the-password")
    with pytest.raises(TargetConfigError) as err:
        open_target(config)
    message = str(err.value)
    assert "rejected user 'hotvmsftp' with the password from environment variable HOTVM_TEST_SSH_PASSWORD" \
        in message
    assert "not-the-password" not in message and "\n" not in message


def test_key_passphrase_from_env(request, tmp_path: Path, monkeypatch, env) -> None:  # noqa: F811
    s = request.getfixturevalue("ssh_server")
    made = make_config("sftp", request, tmp_path, key_file=s.locked_key, password_env="HOTVM_TEST_SSH_PASS")
    monkeypatch.setenv("HOTVM_TEST_SSH_PASS", s.passphrase)
    target = open_target(made.config)
    try:
        target.write_bytes("x", b"by key")
        assert target.read_bytes("x") == b"by key"
    finally:
        target.close()
    monkeypatch.setenv("HOTVM_TEST_SSH_PASS", "wrong passphrase")
    with pytest.raises(TargetConfigError, match=f"rejected user 'root' with key {s.locked_key}"):
        open_target(made.config)


def test_host_key_checking_ignores_ssh_config_and_never_writes_known_hosts(
        request, tmp_path: Path, monkeypatch) -> None:
    """A user's ~/.ssh/config saying "accept anything" changes nothing: no config file is read."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n  StrictHostKeyChecking no\n"
                                          "  UserKnownHostsFile /dev/null\n")
    monkeypatch.setenv("HOME", str(home))
    made = make_config("sftp", request, tmp_path)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(TargetConfigError, match=r"is not in known_hosts"):
        open_target(made.config.model_copy(update={"known_hosts": empty}))
    assert empty.read_text() == ""  # nothing added on first use
    before = made.server.known_hosts.read_text()
    open_target(made.config).close()
    assert made.server.known_hosts.read_text() == before


def test_parallel_connections_recover_after_server_restart(request, tmp_path: Path, env) -> None:  # noqa: F811
    """Export's workers each hold a connection (here up to 4); after a restart every one of them is dead. The
    next writes and export must replace them all (none may fail with the old connection's error), and the
    set restores byte-identical."""
    made = env(make_config("sftp", request, tmp_path, options={"connections": 4}))
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(32 * MiB))
    target = made.open()
    try:
        repo = Repository(target)
        repo.ensure()
        barrier = threading.Barrier(4)

        def hold(i: int) -> None:  # four connections open at once
            barrier.wait()
            target.write_bytes(f"warm/{i}", b"x")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(hold, range(4)))
        assert 2 <= len(_ssh_children()) <= 4
        made.server.stop()
        made.server.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: target.write_bytes(f"after/{i}", bytes([i]) * 1000), range(8)))
        assert target.listdir("after") == [str(i) for i in range(8)]
        record = export_image(repo, device="vda", image=str(image))
        restored = restore_disk(repo, record, tmp_path / "vda.raw", "raw")
        assert Path(restored.path).read_bytes() == image.read_bytes()
    finally:
        target.close()


def test_refused_requests_leave_the_connection_usable(request, tmp_path: Path, env) -> None:  # noqa: F811
    made = env(make_config("sftp", request, tmp_path))
    target = made.open()
    try:
        target.write_bytes("d/blob", b"1" * (3 * MiB))
        with pytest.raises(FileNotFoundError):
            target.read_bytes("d/missing")
        target.write_bytes("d/sub/x", b"2")
        with pytest.raises(TargetError, match="failed writing .*/d/sub: the server said"):
            target.write_bytes("d/sub", b"3" * MiB)  # the rename over a directory is refused
        assert target.read_bytes("d/blob") == b"1" * (3 * MiB)
        assert target.listdir("d") == ["blob", "sub"]  # the temporary file was removed
    finally:
        target.close()


def test_no_ssh_client_is_a_clear_error(request, tmp_path: Path, env, monkeypatch) -> None:  # noqa: F811
    made = env(make_config("sftp", request, tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetConfigError, match="needs OpenSSH's ssh client"):
        made.open()


def test_connections_option_bounds_the_ssh_children(request, tmp_path: Path, env) -> None:  # noqa: F811
    made = env(make_config("sftp", request, tmp_path, options={"connections": 1}))
    target = made.open()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: target.write_bytes(f"c/{i}", os.urandom(MiB)), range(12)))
            assert len(_ssh_children()) == 1
        assert len(target.listdir("c")) == 12
    finally:
        target.close()
    with pytest.raises(ConfigError, match="connections must be from 1 to 16"):
        open_target(made.config.model_copy(update={"options": {"connections": 0}}))


HOSTILE_SERVER = r'''
import struct, sys
mode = sys.argv[1]
r, w = sys.stdin.buffer, sys.stdout.buffer
def msg():
    n = struct.unpack(">I", r.read(4))[0]
    body = r.read(n)
    return body[0], struct.unpack(">I", body[1:5])[0] if len(body) >= 5 else 0
def send(kind, rid, payload=b"", length=None):
    body = bytes([kind]) + struct.pack(">I", rid) + payload
    w.write(struct.pack(">I", len(body) if length is None else length) + body)
    w.flush()
r.read(9)
w.write(struct.pack(">IBI", 5, 2, 3)); w.flush()
while True:
    kind, rid = msg()
    if kind == 3:  # OPEN
        send(102, rid, struct.pack(">I", 1) + b"h")
    elif kind == 17:  # STAT: a file of 100 bytes (or of 8 EiB)
        send(105, rid, struct.pack(">IQ", 1, 1 << 63 if mode == "huge-file" else 100))
    elif kind == 5:  # READ
        if mode == "huge":
            send(103, rid, b"", length=0xFFFFFFF0)
        elif mode == "wrong-id":
            send(103, rid + 7, struct.pack(">I", 100) + b"x" * 100)
        elif mode == "too-much-data":
            send(103, rid, struct.pack(">I", 5000) + b"x" * 5000)
        elif mode == "no-data":  # would make a naive client ask for the rest forever
            send(103, rid, struct.pack(">I", 0))
        else:  # "short-fields": a STATUS without its code
            send(101, rid, b"")
    else:
        send(101, rid, struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", 0))
'''


@pytest.mark.parametrize("mode", ["huge", "wrong-id", "too-much-data", "short-fields", "no-data",
                                  "huge-file"])
def test_hostile_sftp_replies_are_refused_not_trusted(mode: str, tmp_path: Path) -> None:
    """Whatever the server sends is checked before it is used: a length of 4 GiB is refused before any
    allocation, a reply to a request never sent or more data than asked for is a protocol error, and the
    session is then not reused."""
    import sys
    import tempfile

    from targets.sftpwire import ProtocolError, Session

    script = tmp_path / "server.py"
    script.write_text(HOSTILE_SERVER)
    session = Session([sys.executable, str(script), mode], {}, 10, tempfile.TemporaryFile())  # noqa: SIM115
    try:
        session.start(10)
        with pytest.raises(OSError if mode == "huge-file" else ProtocolError):  # no 8 EiB buffer either
            session.read_file("/x")
        assert not session.alive() or mode == "huge-file"
    finally:
        session.close()
