"""Every target scheme against its real server on loopback (Samba, OpenSSH, pyftpdlib, moto), plus file://;
ftp and ftps also against vsftpd ("ftp+vsftpd", "ftps+vsftpd": the server NAS boxes and Linux hosts run).

Servers start once per session (tests/servers.py); each test works under a fresh root on them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import ValidationError
from servers import FtpServer, MotoServer, SambaServer, SshServer, VsftpdServer, free_port

from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TamperedBlob, TargetError, TargetFull
from hotvm.formats.export import export_image
from hotvm.formats.repository import MARKER, Repository
from hotvm.formats.restore import restore_disk
from targets import Target, TargetConfigError, open_target

MiB = 1024 * 1024
SCHEMES = ["file", "smb", "sftp", "ftp", "ftps", "s3"]
VSFTPD = ["ftp+vsftpd", "ftps+vsftpd"]
"""ftp/ftps against vsftpd: no MLST/MLSD, 550 to SIZE of a directory, TLS session reuse required on data
connections, 451 for a failed write, one process per connection."""
BUCKET = "hotvm-backups"

needs = {
    "smb": shutil.which("smbd") and shutil.which("smbpasswd"),
    "sftp": Path("/usr/sbin/sshd").exists(),
    "vsftpd": VsftpdServer.available(),
}


# ---------------------------------------------------------------- servers (once per session)
def _server(request: pytest.FixtureRequest, server):
    request.addfinalizer(server.close)
    return server.start()


@pytest.fixture(scope="session")
def smb_server(request) -> SambaServer:
    if not needs["smb"]:
        pytest.skip("samba is not installed (scripts/install-system-deps.sh)")
    return _server(request, SambaServer())


@pytest.fixture(scope="session")
def ssh_server(request) -> SshServer:
    if not needs["sftp"]:
        pytest.skip("openssh-server is not installed (scripts/install-system-deps.sh)")
    return _server(request, SshServer())


@pytest.fixture(scope="session")
def ftp_server(request) -> FtpServer:
    return _server(request, FtpServer())


@pytest.fixture(scope="session")
def ftps_server(request) -> FtpServer:
    return _server(request, FtpServer(tls=True))


@pytest.fixture(scope="session")
def vsftpd_server(request) -> VsftpdServer:
    if not needs["vsftpd"]:
        pytest.skip("vsftpd is not installed (scripts/install-system-deps.sh)")
    return _server(request, VsftpdServer())


@pytest.fixture(scope="session")
def vsftpds_server(request) -> VsftpdServer:
    if not needs["vsftpd"]:
        pytest.skip("vsftpd is not installed (scripts/install-system-deps.sh)")
    return _server(request, VsftpdServer(tls=True))


@dataclass
class S3Fixture:
    server: MotoServer
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def s3_server(request) -> S3Fixture:
    server = _server(request, MotoServer(auth=True))
    access, secret = server.make_user(BUCKET)
    return S3Fixture(server, access, secret)


# ---------------------------------------------------------------- one config per scheme
@dataclass
class Made:
    config: TargetConfig
    env: dict[str, str] = field(default_factory=dict)
    server: object = None

    def open(self) -> Target:
        return open_target(self.config)


def make_config(scheme: str, request: pytest.FixtureRequest, tmp_path: Path, **update) -> Made:
    sub = uuid.uuid4().hex[:8]
    if scheme == "file":
        made = Made(TargetConfig(name="local", url=f"file://{tmp_path}/target"))
    elif scheme == "smb":
        s = request.getfixturevalue("smb_server")
        made = Made(TargetConfig(name="nas-smb", url=f"smb://{s.user}@127.0.0.1:{s.port}/{s.share}/hotvm-{sub}",
                                 password_env="HOTVM_TEST_SMB_PASSWORD"),
                    {"HOTVM_TEST_SMB_PASSWORD": s.password}, s)
    elif scheme == "sftp":
        s = request.getfixturevalue("ssh_server")
        made = Made(TargetConfig(name="archive-ssh", url=f"sftp://root@127.0.0.1:{s.port}{s.root_dir}/b-{sub}",
                                 key_file=s.client_key, known_hosts=s.known_hosts), server=s)
    elif scheme.split("+")[0] in ("ftp", "ftps"):  # "ftp", "ftps+vsftpd", ...
        scheme, _, flavor = scheme.partition("+")
        server = "vsftpd" if flavor else "ftp"
        s = request.getfixturevalue(f"{server}{'s' if scheme == 'ftps' else ''}_server")
        made = Made(TargetConfig(name=scheme, url=f"{scheme}://{s.user}@127.0.0.1:{s.port}/backups/{sub}",
                                 password_env="HOTVM_TEST_FTP_PASSWORD",
                                 options={"ca_file": str(s.cert)} if scheme == "ftps" else {}),
                    {"HOTVM_TEST_FTP_PASSWORD": s.password}, s)
    elif scheme == "s3":
        f = request.getfixturevalue("s3_server")
        made = Made(TargetConfig(name="s3", url=f"s3://{BUCKET}/prod-{sub}",
                                 endpoint_url=f.server.endpoint_url, access_key_env="HOTVM_TEST_S3_KEY",
                                 secret_key_env="HOTVM_TEST_S3_SECRET"),
                    {"HOTVM_TEST_S3_KEY": f.access_key, "HOTVM_TEST_S3_SECRET": f.secret_key}, f.server)
    else:
        raise AssertionError(scheme)
    if update:
        made.config = made.config.model_copy(update=update)
    return made


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    def apply(made: Made) -> Made:
        for k, v in made.env.items():
            monkeypatch.setenv(k, v)
        return made
    return apply


@pytest.fixture(params=SCHEMES + VSFTPD)
def target(request, tmp_path: Path, env) -> Iterator[Target]:
    tgt = env(make_config(request.param, request, tmp_path)).open()
    yield tgt
    tgt.close()


# ---------------------------------------------------------------- the contract, on every scheme
def test_target_contract(target: Target) -> None:
    target.check()
    assert target.listdir("") == [] and not target.exists("a/b/one.bin")
    target.write_bytes("a/b/one.bin", b"first")
    target.write_bytes("a/b/one.bin", b"second, longer")  # overwrite replaces whole
    target.write_bytes("a/two.bin", b"")
    assert target.read_bytes("a/b/one.bin") == b"second, longer"
    assert target.read_bytes("a/two.bin") == b""
    assert target.exists("a/b/one.bin") and not target.exists("a/b/nope")
    assert target.listdir("a") == ["b", "two.bin"] and target.listdir("a/b") == ["one.bin"]
    assert target.listdir("missing/dir") == []
    with pytest.raises(FileNotFoundError):
        target.read_bytes("a/b/nope")

    blobs = {f"chunks/{i % 3:02x}/{i:04d}": os.urandom(300_000 + i) for i in range(12)}
    with ThreadPoolExecutor(4) as pool:  # export's workers write concurrently, into new directories
        list(pool.map(lambda kv: target.write_bytes(*kv), blobs.items()))
    for path, data in blobs.items():
        assert target.read_bytes(path) == data
    # nothing but the blobs themselves: no temporary names left over
    assert target.listdir("chunks") == ["00", "01", "02"]
    for d in ("00", "01", "02"):
        assert target.listdir(f"chunks/{d}") == sorted(p.rsplit("/", 1)[1] for p in blobs if f"/{d}/" in p)
    assert target.listdir("a/b") == ["one.bin"]

    target.delete("a/two.bin")
    target.delete("a/two.bin")  # deleting what is gone is fine
    assert not target.exists("a/two.bin")
    target.delete_tree("chunks")
    target.delete_tree("chunks")
    assert target.listdir("") == ["a"]
    assert "s3cret" not in target.display("x") and "s3cret" not in repr(target)


def test_blobs_larger_than_one_request_round_trip_whole(target: Target) -> None:
    """Up to a 4 MiB chunk a blob goes in one request where the protocol allows (SMB: one compound to write,
    one to rename, one to read); 9 MiB is more than smbd's largest read and write, so it takes the general
    path. Either way the bytes read back are the bytes written, under their name only."""
    blobs = {name: os.urandom(size) for name, size in
             (("one", 1), ("chunk", 4 * MiB + 4096), ("big", 9 * MiB), ("chunk2", 4 * MiB + 1))}
    for name, data in blobs.items():
        target.write_bytes(f"b/{name}", data)
    for name, data in blobs.items():
        assert target.read_bytes(f"b/{name}") == data
    assert target.listdir("b") == sorted(blobs)


def test_read_into_gives_the_blob_whatever_the_buffer(target: Target) -> None:
    """read_into (a restore's read into a reused buffer) gives exactly the blob: shorter than the buffer,
    exactly its size, or larger but within its limit (then read whole, never cut); beyond the limit (by
    default the buffer's size) it is refused, not cut; a missing blob is FileNotFoundError."""
    buf = bytearray(64 * 1024)
    for size in (1, 1000, len(buf), len(buf) + 1, 3 * len(buf)):
        data = os.urandom(size)
        target.write_bytes(f"r/{size}", data)
        assert bytes(target.read_into(f"r/{size}", buf, 3 * len(buf))) == data
    with pytest.raises(TamperedBlob, match=r"r/65537 on target .* larger than the 65536 bytes"):
        target.read_into(f"r/{len(buf) + 1}", buf)
    with pytest.raises(TamperedBlob, match="damaged or tampered with"):
        target.read_bytes(f"r/{3 * len(buf)}", 3 * len(buf) - 1)
    with pytest.raises(FileNotFoundError):
        target.read_into("r/missing", buf)


def test_a_blob_beyond_its_bound_is_refused_having_read_about_the_bound(target: Target) -> None:
    """A blob 64 times its caller's bound (a tampered target, a server streaming without end) is refused by
    name (the blob, the target, the fix), having allocated no more than a few times the bound, not the
    blob; the target works on afterwards (a connection cut off mid-transfer is replaced)."""
    limit = 256 * 1024
    data = os.urandom(64 * limit)
    target.write_bytes("big/blob", data)
    tracemalloc.start()
    try:
        with pytest.raises(TamperedBlob) as caught:
            target.read_bytes("big/blob", limit)
        with pytest.raises(TamperedBlob):
            target.read_into("big/blob", bytearray(limit))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "big/blob" in message and f"target '{target.name}'" in message, message
    assert f"larger than the {limit} bytes" in message and f"hotvm check --target {target.name}" in message
    assert peak < 8 * limit, f"{peak} bytes allocated to refuse a blob of {len(data)}"
    assert target.read_bytes("big/blob", len(data)) == data
    target.write_bytes("big/small", b"ok")
    assert target.read_bytes("big/small", 2) == b"ok"


def test_grouped_chunks_appear_only_when_durable_and_other_files_at_once(tmp_path: Path) -> None:
    """export groups the fsyncs of a file target's chunks: a chunk shows under its name only once synced
    (never cut short under it after a power cut), anything else (the repository marker) as always, and a
    failed export leaves neither chunks nor temporary files."""
    target = open_target(TargetConfig(name="grouped", url=f"file://{tmp_path}/t"))
    with target.grouped("chunks/"):
        target.write_bytes("chunks/aa/one", b"one")
        target.write_bytes("hotvm-repository.json", b"{}")
        assert target.read_bytes("hotvm-repository.json") == b"{}"
        assert not target.exists("chunks/aa/one")
    assert target.read_bytes("chunks/aa/one") == b"one"
    assert target.listdir("chunks/aa") == ["one"]
    with pytest.raises(RuntimeError), target.grouped("chunks/"):
        target.write_bytes("chunks/bb/two", b"two")
        raise RuntimeError("export failed")
    assert target.listdir("chunks/bb") == []


def test_grouped_chunks_are_synced_in_the_background_and_all_in_place_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups are fsynced and renamed by a background flusher (writers never wait for it); when the block
    ends every chunk is under its name and no temporary file is left, also after a failed export."""
    from concurrent.futures import ThreadPoolExecutor

    from targets import local

    monkeypatch.setattr(local, "GROUP_BLOBS", 3)
    target = open_target(TargetConfig(name="grouped", url=f"file://{tmp_path}/t"))
    blobs = {f"{i:02x}{'0' * 62}": os.urandom(1000 + i) for i in range(40)}
    with target.grouped("chunks/"), ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: target.write_bytes(f"chunks/{n[:2]}/{n}", blobs[n]), blobs))
    for name, data in blobs.items():
        assert target.read_bytes(f"chunks/{name[:2]}/{name}") == data
    assert not [p for p in (tmp_path / "t").rglob("*") if ".tmp-" in p.name]
    with pytest.raises(RuntimeError), target.grouped("chunks/"):
        for i in range(8):
            target.write_bytes(f"chunks/ff/{i:064x}", b"x")
        raise RuntimeError("export failed")
    assert not [p for p in (tmp_path / "t").rglob("*") if ".tmp-" in p.name]
    assert all(target.read_bytes(f"chunks/ff/{name}") == b"x" for name in target.listdir("chunks/ff"))


def qemu_io(image: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        args += ["-c", cmd]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def test_backup_format_roundtrip(target: Target, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "24M"], check=True)
    qemu_io(image, "write -P 0xab 0 1M", "write -P 0xcd 5M 3M", "write -P 0x11 23M 1M")
    repo = Repository(target)
    repo.ensure()
    repo.ensure()  # second time: reads the marker
    assert target.exists(MARKER)
    record = export_image(repo, device="vda", image=str(image))
    assert [i for i, _ in record.chunks] == [0, 1, 5]
    again = export_image(repo, device="vda", image=str(image))
    assert again.bytes_new == 0  # every chunk is found on the target
    restored = restore_disk(repo, record, tmp_path / "out" / "vda.raw", "raw")
    compare = subprocess.run(["qemu-img", "compare", str(image), restored.path], capture_output=True)
    assert compare.returncode == 0, compare.stdout
    chunk_dir = f"chunks/{record.chunks[0][1][:2]}"
    assert target.listdir(chunk_dir) == [record.chunks[0][1]]  # no temporary names left beside it


# ---------------------------------------------------------------- errors: one clear message each
@pytest.mark.parametrize("scheme", ["smb", "ftp", "ftps", *VSFTPD])
def test_wrong_password(scheme: str, request, tmp_path: Path, env) -> None:
    made = env(make_config(scheme, request, tmp_path))
    var = made.config.password_env
    os.environ[var] = "not-the-password"
    with pytest.raises(TargetConfigError) as err:
        made.open()
    assert f"rejected user '{made.server.user}'" in str(err.value) and var in str(err.value)
    assert "not-the-password" not in str(err.value)
    assert isinstance(err.value, ConfigError)  # permanent: the flow's retry policy does not retry it


def test_wrong_s3_secret(request, tmp_path: Path, env) -> None:
    made = env(make_config("s3", request, tmp_path))
    os.environ["HOTVM_TEST_S3_SECRET"] = "not-the-secret"
    with pytest.raises(TargetConfigError, match="rejected the access key or secret key") as err:
        made.open()
    assert "HOTVM_TEST_S3_SECRET" in str(err.value) and "not-the-secret" not in str(err.value)


def test_missing_bucket_and_share(request, tmp_path: Path, env) -> None:
    made = env(make_config("s3", request, tmp_path, url="s3://no-such-bucket/x"))
    with pytest.raises(TargetConfigError, match="bucket 'no-such-bucket' does not exist"):
        made.open()
    s = request.getfixturevalue("smb_server")
    made = env(make_config("smb", request, tmp_path, url=f"smb://{s.user}@127.0.0.1:{s.port}/nosuch/x"))
    with pytest.raises(TargetConfigError, match="has no share 'nosuch'"):
        made.open()


@pytest.mark.parametrize("scheme", ["smb", "ftp", "s3"])
def test_missing_env_var(scheme: str, request, tmp_path: Path, monkeypatch) -> None:
    made = make_config(scheme, request, tmp_path)  # env not applied
    var = next(iter(made.env))
    monkeypatch.delenv(var, raising=False)
    with pytest.raises(TargetConfigError, match=f"environment variable {var} .* is not set"):
        made.open()


@pytest.mark.parametrize("scheme", ["smb", "sftp", "ftp", "s3"])
def test_unreachable_port(scheme: str, request, tmp_path: Path, env) -> None:
    made = env(make_config(scheme, request, tmp_path))
    port = free_port()  # nothing listens there
    url = made.config.url
    if scheme == "s3":  # one attempt: botocore's backoff between three would only slow the test
        made.config = made.config.model_copy(update={"endpoint_url": f"http://127.0.0.1:{port}",
                                                     "options": {"retries": 1}})
    else:
        url = url.replace(f":{made.server.port}/", f":{port}/")
        made.config = made.config.model_copy(update={"url": url})
    name = made.config.name
    with pytest.raises(TargetError, match=f"target '{name}' cannot reach .*127.0.0.1:{port}") as err:
        made.open()
    assert not isinstance(err.value, ConfigError)  # transient: worth a retry


def test_ssh_unknown_and_changed_host_key(request, tmp_path: Path) -> None:
    s = request.getfixturevalue("ssh_server")
    made = make_config("sftp", request, tmp_path)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    unknown = r"host key of 127.0.0.1:\d+ \(ssh-ed25519 SHA256:\S+\) is not in known_hosts"
    with pytest.raises(TargetConfigError, match=unknown) as err:
        open_target(made.config.model_copy(update={"known_hosts": empty}))
    assert "ssh-keyscan -p" in str(err.value)
    wrong_key = s.client_key.with_suffix(".pub").read_text().split()
    empty.write_text(f"[127.0.0.1]:{s.port} {wrong_key[0]} {wrong_key[1]}\n")
    with pytest.raises(TargetConfigError, match="does NOT match known_hosts"):
        open_target(made.config.model_copy(update={"known_hosts": empty}))
    with pytest.raises(TargetConfigError, match="rejected user 'root' with key"):
        open_target(made.config.model_copy(update={"key_file": s.host_key}))


def test_password_never_in_url_or_display(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:  # refused as the config is read, before any target opens
        TargetConfig(name="nas", url="smb://backup:hunter2@127.0.0.1:4450/backups")
    assert "hunter2" not in str(err.value) and "password_env" in str(err.value)
    from targets.base import redact_url

    assert redact_url("ftp://u:p%40ss@h:21/x") == "ftp://u@h:21/x"
    assert redact_url("sftp://root@h/x") == "sftp://root@h/x"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_local_target_full(tiny_tmpfs: Path) -> None:
    tgt = open_target(TargetConfig(name="usb", url=f"file://{tiny_tmpfs}/repo"))
    tgt.write_bytes("small", b"x" * 1000)
    assert tgt.free_bytes() is not None and tgt.free_bytes() < 4 * MiB
    with pytest.raises(TargetFull, match="target 'usb' is full") as err:
        tgt.write_bytes("big", os.urandom(6 * MiB))
    assert "prune" in str(err.value)
    assert tgt.listdir("") == ["small"]  # the half-written temporary file was removed


@pytest.mark.parametrize("scheme", ["smb", "sftp"])
def test_remote_target_full(scheme: str, request, tmp_path: Path, env) -> None:
    """A 4 MiB tmpfs mounted inside the server's share: the server's own "disk full" reaches us as TargetFull
    (SFTP has no such status: a short write is caught by checking the size before the rename)."""
    made = env(make_config(scheme, request, tmp_path))
    server = made.server
    base = server.share_dir if scheme == "smb" else server.root_dir
    sub = f"full-{uuid.uuid4().hex[:6]}"
    (base / sub).mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(base / sub)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        url = made.config.url.rsplit("/", 1)[0] + f"/{sub}/repo"
        tgt = open_target(made.config.model_copy(update={"url": url}))
        try:
            tgt.write_bytes("small", b"x")
            with pytest.raises(TargetFull, match=f"target '{made.config.name}' is full"):
                tgt.write_bytes("big", os.urandom(6 * MiB))
            assert tgt.listdir("") == ["small"]  # no temporary file, no truncated blob under its name
        finally:
            tgt.close()
    finally:
        subprocess.run(["umount", "-l", str(base / sub)], check=False)


# ---------------------------------------------------------------- servers that go away and come back
@pytest.mark.parametrize("scheme", ["smb", "sftp", "ftp", "ftp+vsftpd"])
def test_reconnects_after_server_restart(scheme: str, request, tmp_path: Path, env) -> None:
    made = env(make_config(scheme, request, tmp_path))
    tgt = made.open()
    try:
        tgt.write_bytes("before", b"1")
        made.server.stop()
        with pytest.raises(TargetError, match="cannot reach"):
            tgt.write_bytes("during", b"2")
        made.server.start()
        tgt.write_bytes("after", b"3")  # at once: a dropped pooled connection is replaced on use
        assert tgt.listdir("") == ["after", "before"]
    finally:
        tgt.close()


@pytest.mark.parametrize("scheme", ["smb", "sftp", "ftp", "ftp+vsftpd"])
def test_server_killed_during_export_then_rerun_completes(scheme: str, request, tmp_path: Path, env) -> None:
    made = env(make_config(scheme, request, tmp_path))
    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.write(os.urandom(40 * MiB))  # incompressible: 10 chunks of real uploads
    tgt = made.open()
    try:
        repo = Repository(tgt)
        repo.ensure()

        def kill_server(done: int, total: int) -> None:
            made.server.stop()  # while other chunks are still being uploaded

        with pytest.raises(TargetError):
            export_image(repo, device="vda", image=str(image), progress=kill_server)
        made.server.start()
        record = export_image(repo, device="vda", image=str(image))  # the rerun
        assert len(record.chunks) == 10
        restored = restore_disk(repo, record, tmp_path / "vda.raw", "raw")  # verifies every checksum
        assert Path(restored.path).read_bytes() == image.read_bytes()
    finally:
        tgt.close()


# ---------------------------------------------------------------- credentials from a Prefect Secret block
def test_password_from_prefect_secret(prefect_server, request, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    s = request.getfixturevalue("smb_server")
    block = f"hotvm-test-smb-{uuid.uuid4().hex[:6]}"
    Secret(value=s.password).save(block, overwrite=True)
    made = make_config("smb", request, tmp_path, password_env=None, password_secret=block)
    tgt = made.open()
    tgt.write_bytes("x", b"ok")
    tgt.close()
    with pytest.raises(TargetConfigError, match="Prefect Secret block 'no-such-block' .* does not exist"):
        open_target(made.config.model_copy(update={"password_secret": "no-such-block"}))
    Secret(value="wrong").save(block, overwrite=True)
    with pytest.raises(TargetConfigError, match=f"password from Prefect Secret block '{block}'"):
        open_target(made.config)


def test_core_imports_no_prefect_and_no_scheme_libraries() -> None:
    code = ("import sys, targets; from hotvm.config import TargetConfig; import tempfile; "
            "t = targets.open_target(TargetConfig(name='l', url='file://' + tempfile.mkdtemp())); t.check(); "
            "bad = [m for m in ('prefect', 'paramiko', 'smbclient', 's3fs') if m in sys.modules]; "
            "sys.exit(','.join(bad) or 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr



# ---------------------------------------------------------------- the CLI against every target
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cli_backup_list_restore_on_every_target(scheme: str, request, tmp_path: Path, env, qemu,
                                                 prefect_server) -> None:
    """What a user does: name the target in hotvm.yaml, back up hot, list, restore; bytes come back equal."""
    import json

    import yaml
    from helpers import hotvm
    from qemu_helpers import DiskSpec

    made = env(make_config(scheme, request, tmp_path))
    disk = tmp_path / "data.raw"
    with open(disk, "wb") as fh:
        fh.truncate(16 << 20)
        fh.write(os.urandom(5 << 20))
    vm = qemu([DiskSpec("data", disk, format="raw")])
    config = tmp_path / "hotvm.yaml"
    config.write_text(yaml.safe_dump({
        "hosts": [{"name": f"h-{tmp_path.name}", "vms": [{"name": "web01", "qmp": str(vm.qmp_path)}]}],
        "targets": [made.config.model_dump(mode="json", exclude_defaults=True)],
    }))
    name = made.config.name
    backup = json.loads(hotvm("backup", "web01", "--target", name, "--config", str(config), "--json").stdout)
    assert backup["disks"][0]["bytes_read"] >= 5 << 20
    listed = json.loads(hotvm("list", "--target", name, "--config", str(config), "--json").stdout)
    assert [(e["backup_id"], e["complete"]) for e in listed] == [(backup["backup_id"], True)]
    out = tmp_path / "restored"
    hotvm("restore", "web01", "--to", str(out), "--format", "raw", "--target", name, "--config", str(config))
    vm.stop()
    assert (out / "data.raw").read_bytes() == disk.read_bytes()


def test_scan_reports_what_prune_needs(target: Target) -> None:
    """scan() (prune's listing): fresh names, types, sizes and modification times where the scheme has them;
    ftp/smb sessions are not fsspec filesystems and give names only (prune then never sweeps chunks)."""
    import datetime as dt

    before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    target.write_bytes("s/c/one", b"12345")
    target.write_bytes("s/two", b"")
    assert target.scan("missing") == []
    top = {e.name: e for e in target.scan("s")}
    assert sorted(top) == ["c", "two"]
    (one,) = target.scan("s/c")
    assert one.name == "one"
    if target.scheme in ("ftp", "ftps", "smb"):
        assert one.modified is None
        return
    assert top["c"].is_dir and top["two"].is_dir is False and one.size == 5
    assert one.modified is not None and before < one.modified < before + dt.timedelta(minutes=10)
    target.delete("s/c/one")
    assert target.scan("s/c") == []  # no stale cached listing (s3fs caches ls)
