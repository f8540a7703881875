"""The fast paths of the network targets (issue #15) store and return the exact bytes, on every variant of the
protocol they take or step aside for, against real servers on loopback.

- SMB: chunks are written by targets/smbwire.py (data signed in place, sent with sendmsg) under each signing
  algorithm a server may choose (AES-GMAC on SMB 3.1.1, AES-CMAC on SMB 3.0.2, HMAC-SHA256 on SMB 2.1), and by
  smbprotocol's own path on an encrypted session; the file on the share is byte-identical, and a write cut
  short by a full disk never appears under its final name.
- FTP: a transfer after a listing (which switches the connection to ASCII) is still binary: CR/LF survive.
- SFTP: reads of every size around the 64 KiB request size come back whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from servers import SambaServer
from test_targets import env, ftp_server, ftps_server, make_config, ssh_server  # noqa: F401 - fixtures

from hotvm.config import TargetConfig
from targets import open_target

MiB = 1 << 20

SIGNING = {  # server [global] options -> (dialect, signing algorithm id) the client must end up with
    "gmac": ({}, 0x0311, 2),
    "cmac": ({"server max protocol": "SMB3_02"}, 0x0302, None),
    "hmac": ({"server max protocol": "SMB2_10"}, 0x0210, None),
}


@pytest.fixture(scope="module", params=sorted(SIGNING))
def signing_server(request):
    if not (shutil.which("smbd") and shutil.which("smbpasswd")):
        pytest.skip("samba is not installed (scripts/install-system-deps.sh)")
    options, dialect, algorithm = SIGNING[request.param]
    server = SambaServer(options=options).start()
    request.addfinalizer(server.close)
    return server, dialect, algorithm


def _smb_target(server: SambaServer, monkeypatch: pytest.MonkeyPatch, sub: str, **options):
    monkeypatch.setenv("HOTVM_TEST_SMB_PASSWORD", server.password)
    return open_target(TargetConfig(
        name="nas-smb", url=f"smb://{server.user}@127.0.0.1:{server.port}/{server.share}/{sub}",
        password_env="HOTVM_TEST_SMB_PASSWORD", options=options))


def _connection(target):
    (kw, _), = target._pool._idle  # the one connection this single-threaded test used
    (connection,) = kw["connection_cache"].values()
    return connection


@pytest.mark.parametrize("encrypt", [False, True], ids=["signed", "encrypted"])
def test_smb_chunks_land_byte_exact_under_every_signing_algorithm(signing_server, encrypt: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, dialect, algorithm = signing_server
    if encrypt and dialect < 0x0300:
        pytest.skip("SMB 2.1 has no encryption")
    sub = f"wire-{dialect:x}-{encrypt}"
    target = _smb_target(server, monkeypatch, sub, **({"encrypt": True} if encrypt else {}))
    try:
        blobs = {"chunks/ab/full": os.urandom(4 * MiB + 106), "chunks/ab/odd": os.urandom(65536 * 3 + 7),
                 "chunks/cd/one": b"\x00", "chunks/cd/empty": b"", "manifest": os.urandom(1000)}
        for name, data in blobs.items():
            target.write_bytes(name, data)
        connection = _connection(target)
        assert connection.dialect == dialect
        if algorithm is not None:
            assert connection.signing_algorithm_id == algorithm
        session = next(iter(connection.session_table.values()))
        assert session.encrypt_data is encrypt and (encrypt or session.signing_required)
        for name, data in blobs.items():
            assert (server.share_dir / sub / name).read_bytes() == data  # what the server stored
            assert target.read_bytes(name) == data
        assert sorted(p.name for p in (server.share_dir / sub / "chunks" / "ab").iterdir()) == ["full", "odd"]
    finally:
        target.close()
        shutil.rmtree(server.share_dir / sub, ignore_errors=True)


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "in-an-export"])
def test_smb_write_cut_short_never_appears_under_its_name(grouped: bool, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """The server keeps fewer bytes than sent (it says so in the WRITE reply, as a full disk does): the blob
    must not be renamed into place. Inside an export (grouped) the write returned before its reply was
    checked: the failure comes when the block ends, and stops the export's next chunk write at once."""
    if not (shutil.which("smbd") and shutil.which("smbpasswd")):
        pytest.skip("samba is not installed (scripts/install-system-deps.sh)")
    from contextlib import nullcontext

    from hotvm.errors import TargetFull
    from targets import smbfast

    server = SambaServer().start()
    try:
        target = _smb_target(server, monkeypatch, "cut")
        target.write_bytes("chunks/ab/whole", b"whole")
        real = smbfast.written
        monkeypatch.setattr(smbfast, "written", lambda status, body: real(status, body) - 1)
        with pytest.raises(TargetFull), target.grouped("chunks/") if grouped else nullcontext():
            target.write_bytes("chunks/ab/cut", os.urandom(4 * MiB + 106))
            if grouped:
                with pytest.raises(TargetFull):
                    for i in range(20):
                        target.write_bytes(f"chunks/ab/next-{i}", b"x")
        monkeypatch.undo()
        assert not target.exists("chunks/ab/cut")
        left = [p.name for p in (server.share_dir / "cut" / "chunks" / "ab").iterdir()]
        assert "whole" in left and "cut" not in left and not [n for n in left if ".tmp-" in n]
        target.close()
    finally:
        server.close()


@pytest.mark.parametrize("scheme", ["ftp", "ftps"])
def test_ftp_transfer_after_a_listing_stays_binary(scheme: str, request, tmp_path: Path, env) -> None:  # noqa: F811
    """A listing switches the connection to ASCII (TYPE A); the next write and read switch it back, so
    line ends are not rewritten."""
    made = env(make_config(scheme, request, tmp_path))
    target = made.open()
    try:
        data = b"a\r\nb\nc\r\n\x00\xff" * 50_000
        target.write_bytes("chunks/x", b"first")
        for name in ("y", "z"):
            assert name not in target.listdir("chunks")
            target.write_bytes(f"chunks/{name}", data)
            assert name in target.listdir("chunks")
            assert target.read_bytes(f"chunks/{name}") == data
            assert (made.server.root_dir / target.full(f"chunks/{name}").lstrip("/")).read_bytes() == data
    finally:
        target.close()


def test_sftp_reads_of_every_size_come_back_whole(request, tmp_path: Path, env) -> None:  # noqa: F811
    target = env(make_config("sftp", request, tmp_path)).open()
    try:
        sizes = [0, 1, 65535, 65536, 65537, 4 * MiB, 4 * MiB + 106]
        blobs = {f"b/{size}": os.urandom(size) for size in sizes}
        for name, data in blobs.items():
            target.write_bytes(name, data)
        for name, data in blobs.items():
            assert target.read_bytes(name) == data
        with pytest.raises(FileNotFoundError):
            target.read_bytes("b/missing")
    finally:
        target.close()


@pytest.fixture(scope="module")
def smb_server():
    if not (shutil.which("smbd") and shutil.which("smbpasswd")):
        pytest.skip("samba is not installed (scripts/install-system-deps.sh)")
    server = SambaServer().start()
    yield server
    server.close()


def _give(server: SambaServer, sub: str) -> None:
    """Hand what the test made on the share to the share's user, as if the server had made it."""
    for path in [server.share_dir / sub, *(server.share_dir / sub).rglob("*")]:
        shutil.chown(path, server.user)


def test_smb_directory_removed_behind_the_targets_back_is_made_again(smb_server, monkeypatch) -> None:
    """The target remembers which directories exist (a write into one sends no directory CREATE): when one
    is removed by someone else, the next write there makes it again and lands whole."""
    target = _smb_target(smb_server, monkeypatch, "gone")
    try:
        target.write_bytes("chunks/ab/one", b"one")
        shutil.rmtree(smb_server.share_dir / "gone" / "chunks" / "ab")
        target.write_bytes("chunks/ab/two", b"two")
        shutil.rmtree(smb_server.share_dir / "gone" / "chunks")
        data = os.urandom(4 * MiB + 106)
        target.write_bytes("chunks/ab/three", data)
        assert (smb_server.share_dir / "gone" / "chunks" / "ab" / "three").read_bytes() == data
        assert target.listdir("chunks/ab") == ["three"]
    finally:
        target.close()


def test_smb_file_where_a_directory_should_be_is_a_clear_error(smb_server, monkeypatch) -> None:
    from hotvm.errors import TargetError

    (smb_server.share_dir / "blocked" / "chunks").mkdir(parents=True)
    (smb_server.share_dir / "blocked" / "chunks" / "cd").write_bytes(b"not a directory")
    _give(smb_server, "blocked")
    target = _smb_target(smb_server, monkeypatch, "blocked")
    try:
        for path in ("chunks/cd/x", "chunks/cd/deeper/x"):
            with pytest.raises(TargetError, match="chunks/cd is a file where hotvm needs a directory"):
                target.write_bytes(path, b"x")
        assert (smb_server.share_dir / "blocked" / "chunks" / "cd").read_bytes() == b"not a directory"
    finally:
        target.close()


def test_smb_export_skips_lookups_only_in_directories_it_created(smb_server, monkeypatch) -> None:
    """Inside an export (grouped), a chunk whose directory this export created cannot be on the share yet,
    so exists_for_write answers without asking (someone else writing it meanwhile costs a second, identical
    write); a chunk in a directory that was there before is looked up as always. Outside an export, it is
    exists()."""
    (smb_server.share_dir / "old" / "chunks" / "aa").mkdir(parents=True)
    (smb_server.share_dir / "old" / "chunks" / "aa" / "old").write_bytes(b"old")
    _give(smb_server, "old")
    for sub, fresh in (("old", False), ("new", True)):
        target = _smb_target(smb_server, monkeypatch, sub)
        someone = _smb_target(smb_server, monkeypatch, sub)  # another backup writing to the repository
        try:
            with target.grouped("chunks/"):  # makes chunks/ where it is missing: all below it is fresh
                assert target.exists_for_write("chunks/aa/old") is (sub == "old")
                target.write_bytes("chunks/bb/new", b"new")
                assert not target.exists_for_write("chunks/bb/other")
                someone.write_bytes("chunks/bb/other", b"x")
                assert target.exists_for_write("chunks/bb/other") is not fresh  # asked only if not fresh
            assert target.read_bytes("chunks/bb/new") == b"new"
            assert target.exists_for_write("chunks/bb/other")  # outside an export: always asked
            assert not target.exists_for_write("chunks/bb/missing")
        finally:
            target.close()
            someone.close()


def test_smb_concurrent_logons_never_hang(smb_server, monkeypatch) -> None:
    """Export's writers open their connections at once. With one client GUID for all of them (smbclient's
    default) Samba passed each new connection to the smbd process of the first, and now and then such a
    logon got no session-setup reply ("client used more credits than granted, mid 1" in smbd's log): before
    the fix, 60 waves of eight logons failed in the first few, 12 waves passed once."""
    from concurrent.futures import ThreadPoolExecutor

    for wave in range(30):
        target = _smb_target(smb_server, monkeypatch, f"logon-{wave}", timeout=5)
        try:
            with ThreadPoolExecutor(8) as pool:
                assert not any(pool.map(target.exists, [f"nothing-{i}" for i in range(8)]))
        finally:
            target.close()
    assert "more credits than granted" not in smb_server.log()


@pytest.fixture
def samba():
    if not (shutil.which("smbd") and shutil.which("smbpasswd")):
        pytest.skip("samba is not installed (scripts/install-system-deps.sh)")
    server = SambaServer(options={"server signing": "mandatory"}).start()
    yield server
    server.close()


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "in-an-export"])
def test_smb_chunk_replaces_its_name_and_finds_its_directory_again(samba: SambaServer, grouped: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk written over an existing one replaces it whole; a directory the target made and someone then
    removed is made again (the write is sent again); a file where a chunk directory should be fails that
    chunk with a clear error, and nothing is left under a temporary name."""
    from contextlib import nullcontext

    from hotvm.errors import TargetError

    target = _smb_target(samba, monkeypatch, "again")
    base = samba.share_dir / "again"
    try:
        target.write_bytes("chunks/ab/one", b"old")
        target.write_bytes("chunks/cd/two", b"two")
        shutil.rmtree(base / "chunks" / "cd")  # behind the target's back: it still thinks cd/ is there
        (base / "chunks" / "ef").write_bytes(b"a file in the way")
        new = os.urandom(4 * MiB + 106)
        with target.grouped("chunks/") if grouped else nullcontext():
            target.write_bytes("chunks/ab/one", new)
            target.write_bytes("chunks/cd/three", b"three")
        assert (base / "chunks" / "ab" / "one").read_bytes() == new
        assert (base / "chunks" / "cd" / "three").read_bytes() == b"three"
        with pytest.raises(TargetError, match="is a file where hotvm needs a directory"), \
                target.grouped("chunks/") if grouped else nullcontext():
            target.write_bytes("chunks/ef/four", b"four")
        assert (base / "chunks" / "ef").read_bytes() == b"a file in the way"
        assert not _leftovers(base)
    finally:
        target.close()


@pytest.mark.parametrize("forgery", ["body", "unsigned"])
def test_smb_chunk_reply_with_a_bad_signature_fails_the_write(samba: SambaServer, forgery: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On a session that signs, a chunk write's reply whose signature does not verify (a byte changed), or
    that claims success unsigned (smbprotocol would take that), is refused: the write fails (the connection
    is dropped, as smbprotocol does on a bad signature) and the chunk never appears under its name."""
    from hotvm.errors import TargetError

    target = _smb_target(samba, monkeypatch, "forged")
    try:
        target.write_bytes("chunks/ab/good", b"good")
        transport = _connection(target).transport
        real = transport._recv

        def tampered(size, timeout):
            data, left = real(size, timeout)
            if size > 64 and forgery == "body":  # a reply, not the length in front of it
                data = data[:-1] + bytes([data[-1] ^ 1])
            elif size > 64:  # the SMB2_FLAGS_SIGNED bit of the first reply header
                data = data[:16] + bytes([data[16] & ~8]) + data[17:]
            return data, left

        monkeypatch.setattr(transport, "_recv", tampered)
        with pytest.raises(TargetError):
            target.write_bytes("chunks/ab/bad", os.urandom(MiB))
        monkeypatch.undo()
        base = samba.share_dir / "forged" / "chunks" / "ab"
        assert sorted(p.name for p in base.iterdir() if ".tmp-" not in p.name) == ["good"]
    finally:
        target.close()


def test_smb_chunk_replies_taken_by_smbprotocols_loop_work_too(samba: SambaServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply the fast path does not take itself (one arriving in a message with replies to other requests)
    goes through smbprotocol's receive loop, which checks its signature and credits: the chunk writes, the
    grouped ones included, still land whole and under their names only."""
    from targets import smbfast

    monkeypatch.setattr(smbfast.Wire, "take", lambda self, msg: False)
    target = _smb_target(samba, monkeypatch, "loop")
    try:
        blobs = {f"chunks/{i % 3:02x}/{i}": os.urandom(MiB + i) for i in range(12)}
        with target.grouped("chunks/"):
            for name, data in blobs.items():
                target.write_bytes(name, data)
        for name, data in blobs.items():
            assert (samba.share_dir / "loop" / name).read_bytes() == data
        assert not _leftovers(samba.share_dir / "loop")
        connection = _connection(target)
        assert not connection.outstanding_requests and not connection.hotvm_wire.pending
    finally:
        target.close()
