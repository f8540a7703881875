"""FTP(S) target behaviour that the issue #15 changes rely on, against real servers on loopback: pyftpdlib
and vsftpd ("ftp+vsftpd": no MLST/MLSD, TLS session reuse required on data connections, 451 on a full disk).

- Many chunks written in parallel (export's workers, one control connection each) into directories made
  during the run land whole under their names, with no temporary file left, including a chunk another
  writer stored meanwhile in a directory this run made (it is written again, identical).
- A later run into the existing chunk directories finds every chunk (nothing written twice).
- A server that refuses pipelined commands still gets every blob renamed into place.
- A server restarted in the middle of a run: the next operations reconnect at once, without a pause.
- A full disk on the server: one clear error naming the blob, no partial file left, the target still usable.
- A server that closes idle connections (vsftpd's idle_session_timeout): the next operation just works.
- A server that allows fewer connections per address than export has workers (vsftpd's max_per_ip): the
  backup and the restore complete on as many as it allows.
- ftps:// to a server without TLS, ftp:// to one that requires it, an unreadable ca_file: one clear
  configuration error each (vsftpd's 530 replies to both read as a wrong password).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from servers import FtpServer, VsftpdServer
from test_targets import (  # noqa: F401 - fixtures
    env,
    ftp_server,
    ftps_server,
    make_config,
    vsftpd_server,
    vsftpds_server,
)

from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetError
from hotvm.formats.export import export_image
from hotvm.formats.repository import Repository
from hotvm.formats.restore import restore_disk
from targets import TargetConfigError, open_target

MiB = 1 << 20


def _restores_byte_identical(target, image: Path, tmp_path: Path) -> None:
    """Back `image` up to `target` (closed afterwards) and restore it: the same bytes come back."""
    try:
        repo = Repository(target)
        repo.ensure()
        record = export_image(repo, device="vda", image=str(image))
        restored = restore_disk(repo, record, tmp_path / "out.raw", "raw")
        assert Path(restored.path).read_bytes() == image.read_bytes()
    finally:
        target.close()


def _open_ftp(server: FtpServer | VsftpdServer, monkeypatch: pytest.MonkeyPatch):
    """A plain ftp:// target on `server`, under /b, its password in the environment."""
    monkeypatch.setenv("HOTVM_TEST_FTP_PASSWORD", server.password)
    return open_target(TargetConfig(name="ftp", url=f"ftp://{server.user}@127.0.0.1:{server.port}/b",
                                    password_env="HOTVM_TEST_FTP_PASSWORD"))


def _files_on_server(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("scheme", ["ftp", "ftps", "ftp+vsftpd", "ftps+vsftpd"])
def test_parallel_chunks_into_new_directories_land_whole(scheme: str, request, tmp_path: Path,
                                                         env) -> None:  # noqa: F811
    made = env(make_config(scheme, request, tmp_path))
    target, other = made.open(), made.open()
    try:
        blobs = {f"chunks/{i % 6:02x}/{i:064x}": os.urandom(MiB + i) for i in range(30)}
        raced = "chunks/05/" + "f" * 64  # stored by another writer inside a directory this run makes
        blobs[raced] = os.urandom(3000)
        with target.grouped("chunks/"), ThreadPoolExecutor(6) as pool:
            assert not target.exists_for_write("chunks/00/" + "0" * 64)

            def store(path: str) -> None:  # as export does
                if not target.exists_for_write(path):
                    target.write_bytes(path, blobs[path])

            list(pool.map(store, [p for p in blobs if p != raced]))
            assert all(target.exists_for_write(p) for p in blobs if p != raced)  # written: asked for
            other.write_bytes(raced, blobs[raced])
            assert target.exists(raced)  # a plain check always asks the server
            store(raced)  # exists_for_write need not look (a directory it made): then it is written again
        for path, data in blobs.items():
            assert target.exists(path)
            assert target.read_bytes(path) == data
        root = made.server.root_dir / target.root.lstrip("/")
        assert _files_on_server(root) == sorted(blobs)  # nothing else: no temporary names left
    finally:
        target.close()
        other.close()


@pytest.mark.parametrize("scheme", ["ftp", "ftp+vsftpd"])
def test_a_later_run_finds_every_chunk_in_existing_directories(scheme: str, request, tmp_path: Path,
                                                              env) -> None:  # noqa: F811
    """Each run lists the chunk directories once instead of making them again (vsftpd: no MLSD, so MKD
    finds them); the chunks in them are still looked for one by one (vsftpd: no MLST, so SIZE), so a second
    backup of the same disk stores nothing new."""
    made = env(make_config(scheme, request, tmp_path))
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(12 * MiB))
    first_target = made.open()
    try:
        repo = Repository(first_target)
        repo.ensure()
        first = export_image(repo, device="vda", image=str(image))
    finally:
        first_target.close()
    assert first.bytes_new > 12 * MiB
    with open(image, "r+b") as fh:  # one chunk changes
        fh.seek(5 * MiB)
        fh.write(os.urandom(4096))
    second_target = made.open()  # a new run: nothing remembered from the first
    try:
        repo = Repository(second_target)
        second = export_image(repo, device="vda", image=str(image))
        assert 0 < second.bytes_new < 4 * MiB + 4096  # only the changed chunk
        restored = restore_disk(repo, second, tmp_path / "out.raw", "raw")
        assert Path(restored.path).read_bytes() == image.read_bytes()
    finally:
        second_target.close()


def test_server_that_refuses_pipelined_commands_still_gets_every_rename(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FtpServer(pipelining=False) as server:
        target = _open_ftp(server, monkeypatch)
        try:
            blobs = {f"chunks/{i:02x}/{i:064x}": os.urandom(100_000 + i) for i in range(8)}
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda p: target.write_bytes(p, blobs[p]), blobs))
            target.write_bytes("marker", b"one")
            target.write_bytes("marker", b"two")  # over an existing file
            assert target.read_bytes("marker") == b"two"
            assert all(target.read_bytes(p) == d for p, d in blobs.items())
            assert _files_on_server(server.root_dir / "b") == sorted([*blobs, "marker"])
        finally:
            target.close()


@pytest.mark.parametrize("scheme", ["ftp", "ftps", "ftp+vsftpd", "ftps+vsftpd"])
def test_server_restarted_mid_run_is_reconnected_at_once(scheme: str, request, tmp_path: Path,
                                                         env) -> None:  # noqa: F811
    """Every pooled connection died with the server; the next writes and reads (in parallel, right after
    the restart: no idle probe has run) replace them and succeed."""
    made = env(make_config(scheme, request, tmp_path))
    target = made.open()
    try:
        before = {f"chunks/aa/{i:064x}": os.urandom(200_000) for i in range(8)}
        after = {f"chunks/bb/{i:064x}": os.urandom(200_000) for i in range(8)}
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: target.write_bytes(p, before[p]), before))
            made.server.stop()
            made.server.start()
            list(pool.map(lambda p: target.write_bytes(p, after[p]), after))
            got = dict(zip(before, pool.map(target.read_bytes, before), strict=True))
        assert got == before
        assert all(target.read_bytes(p) == d for p, d in after.items())
    finally:
        target.close()


@pytest.mark.parametrize("scheme", ["ftps", "ftps+vsftpd"])
def test_export_over_ftps_restores_byte_identical(scheme: str, request, tmp_path: Path,
                                                  env) -> None:  # noqa: F811
    """The whole chunk path (grouped listing, no MLST in new directories, pipelined renames) over TLS."""
    made = env(make_config(scheme, request, tmp_path))
    image = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "20M", str(image)], check=True)
    with open(image, "r+b") as fh:
        fh.write(os.urandom(6 * MiB))
        fh.seek(13 * MiB)
        fh.write(os.urandom(MiB))
    _restores_byte_identical(made.open(), image, tmp_path)


@pytest.mark.parametrize("scheme", ["ftp+vsftpd", "ftps+vsftpd"])
def test_full_disk_is_one_clear_error_and_leaves_nothing(scheme: str, request, tmp_path: Path,
                                                        env) -> None:  # noqa: F811
    """vsftpd ends the data connection and answers "451 Failure writing to local file." (over TLS the
    broken data connection once read as "cannot reach"); FTP does not say whether the disk is full, so it
    is an aborted write with that hint, not TargetFull. No partial file stays; the target stays usable."""
    made = env(make_config(scheme, request, tmp_path))
    server = made.server
    sub = server.root_dir / f"full-{tmp_path.name[-12:]}"
    sub.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(sub)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        shutil.chown(sub, server.user)
        tgt = open_target(made.config.model_copy(
            update={"url": made.config.url.rsplit("/", 2)[0] + f"/{sub.name}/repo"}))
        try:
            tgt.write_bytes("small", b"x")
            with pytest.raises(TargetError, match=r"aborted writing .*/repo/big \(451 .*disk may be full"):
                tgt.write_bytes("big", os.urandom(6 * MiB))
            assert tgt.listdir("") == ["small"]  # the temporary file was removed
            tgt.write_bytes("after", b"y")
            assert tgt.read_bytes("after") == b"y"
        finally:
            tgt.close()
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=False)


@pytest.mark.skipif(not VsftpdServer.available(), reason="vsftpd is not installed")
def test_server_closing_idle_connections_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """vsftpd says "421 Timeout." and closes a control connection idle for idle_session_timeout (300 s by
    default; 1 s here): the next write and read, in parallel, get new connections and succeed."""
    with VsftpdServer(options={"idle_session_timeout": "1"}) as server:
        target = _open_ftp(server, monkeypatch)
        try:
            blobs = {f"chunks/{i:02x}/{i:064x}": os.urandom(100_000 + i) for i in range(4)}
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda p: target.write_bytes(p, blobs[p]), blobs))
                time.sleep(1.5)
                list(pool.map(lambda p: target.write_bytes(p + "-2", blobs[p]), blobs))
                assert list(pool.map(target.read_bytes, blobs)) == list(blobs.values())
        finally:
            target.close()


@pytest.mark.skipif(not VsftpdServer.available(), reason="vsftpd is not installed")
def test_server_allowing_fewer_connections_than_workers(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """vsftpd with max_per_ip=2 answers a third connection with "421 There are too many connections from
    your internet address." (it failed the whole backup as "cannot reach"): export's 4 workers and
    restore's readers share the 2 it allows."""
    with VsftpdServer(options={"max_per_ip": "2"}) as server:
        image = tmp_path / "disk.raw"
        image.write_bytes(os.urandom(24 * MiB))
        _restores_byte_identical(_open_ftp(server, monkeypatch), image, tmp_path)


def test_scheme_that_does_not_match_the_server_is_a_config_error(request, tmp_path: Path,
                                                                  env) -> None:  # noqa: F811
    plain = env(make_config("ftp+vsftpd", request, tmp_path))
    tls = env(make_config("ftps+vsftpd", request, tmp_path))
    as_ftps = plain.config.model_copy(update={"url": plain.config.url.replace("ftp://", "ftps://", 1),
                                              "options": {"verify": False}})
    with pytest.raises(TargetConfigError, match=r"does not speak FTPS \(530 Please login") as err:
        open_target(as_ftps)
    assert "use an ftp:// URL" in str(err.value) and "rejected" not in str(err.value)
    as_ftp = tls.config.model_copy(update={"url": tls.config.url.replace("ftps://", "ftp://", 1),
                                           "options": {}})
    with pytest.raises(TargetConfigError, match=r"requires TLS \(530 Non-anonymous sessions must use encr"):
        open_target(as_ftp)
    missing = tls.config.model_copy(update={"options": {"ca_file": str(tmp_path / "nope.pem")}})
    with pytest.raises(ConfigError, match=r"cannot read ca_file .*nope.pem \(No such file"):
        open_target(missing)
