"""Fuzzing the restore side with hostile entries and tar members: whatever a guest or a target hands over,
nothing outside the destination changes, and the only failures are HotvmError (one clear line).

The core functions are called directly (files restore, the hybrid tree apply, the config-archive unpacker)
on a temporary root whose sibling 'outside' tree is the sentinel: symlinks to it, '..' paths at it, hard
links to its files, entries below symlinks, names with '/', NUL or too many bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from pathlib import Path

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotvm.errors import BackupSetError, HotvmError
from hotvm.files.hybrid import apply_tree
from hotvm.files.restore import restore_entries
from hotvm.formats.configtar import unpack_config_archive

CONTENT = b"restored content " * 8
DIGEST = hashlib.sha256(CONTENT).hexdigest()
CHUNKS = {DIGEST: CONTENT}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)

names = st.one_of(
    st.sampled_from(
        ["a", "b", "dir", "link", "file.txt", "..", ".", "", "a/..", "x/../../outside", "caf\udce9"]
    ),
    st.text(alphabet="ab./\0\udcff", min_size=1, max_size=6),
    st.just("n" * 300),
)
paths = st.one_of(
    st.lists(names, min_size=1, max_size=4).map(lambda p: "/v/" + "/".join(p)),
    st.sampled_from(["/v/../../outside/secret", "/v/link/secret", "/v/link/new", "/../outside/secret", "/"]),
)
targets = st.sampled_from(
    ["OUTSIDE", "../../outside", "../outside/secret", "a", "", "link", "x\0y", "OUTSIDE/secret"]
)
BAD_VALUES = {
    "size": [-5, 2**70, 3], "mode": [-1, 2**40], "uid": [-1, 2**40], "mtime_ns": [-(2**70), 2**80],
    "pieces": [[[DIGEST, 0, 3]], [["../../x", 0, 3]], [[DIGEST, -1, 5]], [], "x"], "path": [7, None],
    "kind": ["bogus"], "target": [3],
}  # fmt: skip


@st.composite
def entries(draw: st.DrawFn) -> dict:
    """Mostly well-formed entries (hostile names and targets), some with one field forged or missing."""
    kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "other"]))
    entry: dict = {
        "path": draw(paths), "kind": kind, "size": len(CONTENT) if kind == "file" else 0,
        "mode": draw(st.sampled_from([0o644, 0o755, 0o4777])), "uid": draw(st.sampled_from([0, 1000])),
        "gid": 0, "mtime_ns": 10**18, "atime_ns": 0, "ctime_ns": 0, "inode": 1,
        "nlink": draw(st.sampled_from([1, 2])),
        "target": draw(targets) if kind == "symlink" else None,
        "link": draw(st.sampled_from([None, None, "/v/a", "/../outside/secret", "/v/link/secret"])),
        "content": None, "pieces": [[DIGEST, 0, len(CONTENT)]] if kind == "file" else None,
    }  # fmt: skip
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        entry[key] = draw(st.sampled_from(BAD_VALUES[key]))
    if draw(st.integers(0, 7)) == 0:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry


def reader(e: dict):  # noqa: ANN201
    for digest, offset, length in e.get("pieces") or ():
        if digest not in CHUNKS:
            raise BackupSetError(f"chunk {digest[:16]} is missing", "use another backup")
        yield CHUNKS[digest][offset : offset + length]


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under `root`, symlinks not followed: type, mode, bytes or target."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                body: object = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                body = Path(path).read_bytes()
            else:
                body = None
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), body)
    return out


def lab() -> tuple[tempfile.TemporaryDirectory, Path, Path]:
    """base/outside (the sentinel: a 0600 secret, a subdir) and base/dest holding a planted symlink to it."""
    tmp = tempfile.TemporaryDirectory(prefix="hotvm-fuzz-")
    base = Path(tmp.name)
    outside = base / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    os.chmod(outside / "secret", 0o600)
    dest = base / "dest"
    (dest / "v").mkdir(parents=True)
    os.symlink(str(outside), dest / "v" / "link")
    return tmp, outside, dest


def _resolve(entries_: list[dict], outside: Path) -> list[dict]:
    for e in entries_:
        if isinstance(e.get("target"), str):
            e["target"] = e["target"].replace("OUTSIDE", str(outside))
    return entries_


@FUZZ
@given(st.lists(entries(), max_size=8), st.booleans())
def test_files_restore_never_writes_outside(batch: list[dict], overwrite: bool) -> None:
    tmp, outside, dest = lab()
    with tmp:
        before = snapshot(outside)
        try:
            report = restore_entries(_resolve(batch, outside), reader, dest, overwrite=overwrite)
        except HotvmError:
            report = None
        assert snapshot(outside) == before
        assert sorted(os.listdir(Path(tmp.name))) == ["dest", "outside"]
        if report is not None:
            assert all(isinstance(s, str) and s.isprintable() for s in report.skipped)


@FUZZ
@given(st.lists(entries(), max_size=8))
def test_hybrid_apply_never_writes_outside(batch: list[dict]) -> None:
    tmp, outside, dest = lab()
    with tmp:
        before = snapshot(outside)
        for e in batch:  # the hybrid takes volume-relative paths
            if isinstance(e.get("path"), str):
                e["path"] = e["path"].removeprefix("/v")
        with contextlib.suppress(HotvmError):
            apply_tree(dest / "v", _resolve(batch, outside), reader)
        assert snapshot(outside) == before
        assert sorted(os.listdir(Path(tmp.name))) == ["dest", "outside"]


member_types = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                tarfile.CHRTYPE, tarfile.FIFOTYPE])  # fmt: skip
member_names = st.one_of(
    st.sampled_from(["files/etc/vm.sh", "documents/domain.xml", "vm-description.json",
                     "files/../../outside/x", "/outside/abs", "files/link/x", "files", "files/etc",
                     "./files/a", "files//b"]),
    st.lists(names, min_size=1, max_size=4).map("/".join),
)  # fmt: skip


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for _ in range(draw(st.integers(0, 6))):
            info = tarfile.TarInfo(draw(member_names))
            info.type = draw(member_types)
            info.linkname = draw(st.sampled_from(["../../outside/secret", "/etc/passwd", "files/etc/vm.sh"]))
            info.mode = draw(st.sampled_from([0o644, 0o4755, 0o777]))
            data = b"x" * draw(st.integers(0, 64)) if info.type == tarfile.REGTYPE else b""
            info.size = len(data)
            try:
                tar.addfile(info, io.BytesIO(data))
            except (ValueError, UnicodeEncodeError):
                continue  # a name tarfile itself cannot write
    body = raw.getvalue()
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # truncated
    return zstandard.ZstdCompressor().compress(body)


@FUZZ
@given(archives())
def test_config_unpack_never_writes_outside(data: bytes) -> None:
    tmp, outside, dest = lab()
    with tmp:
        before = snapshot(outside)
        (dest / "restored" / "files").mkdir(parents=True)
        os.symlink(str(outside), dest / "restored" / "files" / "link")  # planted where members may go
        try:
            written = unpack_config_archive(data, dest / "restored")
        except HotvmError:
            written = []
        assert snapshot(outside) == before
        for name in written:
            assert os.path.realpath(dest / "restored" / name).startswith(str(dest / "restored"))
        for path in (dest / "restored").rglob("*"):
            assert path.name == "link" or (not path.is_symlink() and (path.is_file() or path.is_dir()))


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=512))
def test_config_unpack_refuses_garbage_cleanly(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(BackupSetError):
        unpack_config_archive(data, Path(tmp) / "config")


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=40))
def test_printable_names_are_lossless_and_printable(raw: bytes) -> None:
    """The catalog's and the messages' form of a name gives back its exact bytes."""
    from hotvm.safepath import printable, unprintable

    name = os.fsdecode(raw)
    shown = printable(name)
    assert shown.isprintable() or not shown
    assert os.fsencode(unprintable(shown)) == raw


def test_a_frame_claiming_more_than_the_bound_is_refused_before_allocation() -> None:
    """zstd allocates what a frame header claims; a forged claim is refused first (known or unknown size)."""
    import pytest

    from hotvm.files.filesets import decompress_bounded

    data = b"x" * 100_000
    for frame in (
        zstandard.ZstdCompressor(write_content_size=True).compress(data),
        zstandard.ZstdCompressor(write_content_size=False).compress(data),
    ):
        assert decompress_bounded(frame, len(data)) == data
        with pytest.raises(zstandard.ZstdError):
            decompress_bounded(frame, 1000)


def test_decompressing_into_a_buffer_keeps_the_same_bounds() -> None:
    """decompress_into (the restore's path into reused buffers) accepts what decompress_bounded accepts
    and refuses what it refuses, whatever the frame says about its size or window."""
    import pytest

    from hotvm.formats.export import decompress_into

    data = os.urandom(50_000) + b"x" * 50_000
    for frame in (
        zstandard.ZstdCompressor(write_content_size=True).compress(data),
        zstandard.ZstdCompressor(write_content_size=False).compress(data),
        zstandard.ZstdCompressor(level=19, write_content_size=False).compress(data),
    ):
        out = bytearray(len(data) + 7)
        assert bytes(decompress_into(frame, memoryview(out))) == data
        assert bytes(decompress_into(memoryview(frame), memoryview(out)[: len(data)])) == data
        with pytest.raises(zstandard.ZstdError):
            decompress_into(frame, memoryview(bytearray(1000)))
    # a 16 MiB window (a stream compressed without a known size), wider than the streaming cap: decoded
    # all the same (through decompress_bounded)
    streaming = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters(window_log=24, write_content_size=False)
    ).compressobj()
    wide = streaming.compress(data) + streaming.flush()
    assert zstandard.get_frame_parameters(wide).window_size == 16 << 20
    assert bytes(decompress_into(wide, memoryview(bytearray(len(data))))) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=8192))
def test_decompressing_garbage_into_a_buffer_fails_cleanly(garbage: bytes, limit: int) -> None:
    """Hostile bytes give at most `limit` bytes or ZstdError, nothing else."""
    from hotvm.formats.export import decompress_into

    try:
        view = decompress_into(b"\x28\xb5\x2f\xfd" + garbage, memoryview(bytearray(limit)))
    except zstandard.ZstdError:
        return
    assert len(view) <= limit


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=600_000), st.booleans(), st.data())
def test_a_raw_block_layout_is_the_frame_content_or_nothing(length: int, checksum: bool, data) -> None:
    """rawframe: for a frame of raw blocks, the planned scatter gives exactly the content; any byte of
    its headers changed makes the layout refuse (then the usual decompression decides)."""
    from hotvm.formats.rawframe import raw_layout

    content = os.urandom(length)
    frame = bytearray(zstandard.ZstdCompressor(level=1, write_checksum=checksum).compress(content))
    layout = raw_layout(bytes(frame[:32]), len(frame), length)
    assert layout is not None
    out, scratch = bytearray(length), bytearray(64 + 3 * (length // 131072 + 1))
    views = layout.views(memoryview(out), memoryview(scratch))
    pos = 0
    for view in views:
        view[:] = frame[pos : pos + len(view)]
        pos += len(view)
    assert pos == len(frame) and bytes(out) == content
    assert layout.check(bytes(frame[:32]), memoryview(scratch))
    at = data.draw(st.integers(min_value=0, max_value=layout.header + 3 * layout.blocks - 1))
    forged = bytearray(scratch)
    forged[at] ^= 0x10
    assert not layout.check(bytes(frame[:32]), memoryview(forged))
    assert raw_layout(bytes(frame[:32]), len(frame) + 1, length) is None
    assert raw_layout(bytes(frame[:32]), len(frame), length + 1) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=600_000))
def test_a_raw_frame_built_without_zstd_is_a_zstd_frame_of_its_content(length: int) -> None:
    """rawframe.raw_frame: plain zstandard (one-shot, streaming, and hotvm's bounded decompress_into)
    gives back exactly the content, and raw_layout recognises the frame, so restores scatter-read it."""
    from hotvm.formats.export import decompress_into
    from hotvm.formats.rawframe import raw_frame, raw_layout

    content = os.urandom(length)
    frame = raw_frame(memoryview(content))
    assert zstandard.frame_content_size(frame) == length
    assert zstandard.ZstdDecompressor().decompress(frame) == content
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == content
    assert bytes(decompress_into(frame, memoryview(bytearray(max(length, 1))))) == content
    layout = raw_layout(frame[:32], len(frame), length)
    assert layout is not None and layout.size == len(frame) and not layout.checksum
