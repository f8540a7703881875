"""The backup-set format on its own: export real images (qemu-img made) and restore them byte for byte."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import mounted_tmpfs

from hotvm.config import TargetConfig
from hotvm.errors import BackupSetError, ChecksumMismatch
from hotvm.formats.export import export_image
from hotvm.formats.repository import Repository
from hotvm.formats.restore import restore_disk
from targets import open_target

MiB = 1024 * 1024


def qemu_io(image: Path, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for cmd in cmds:
        args += ["-c", cmd]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True).returncode == 0


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo = Repository(open_target(TargetConfig(name="t", url=f"file://{tmp_path}/target")))
    repo.ensure()
    return repo


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_restore_roundtrip(tmp_path: Path, repo: Repository, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "64M"], check=True)
    qemu_io(image, fmt, "write -P 0xab 0 1M", "write -P 0xcd 9M 3M", "write -P 0x11 63M 1M")
    record = export_image(repo, device="data", image=str(image))
    assert record.virtual_size == 64 * MiB
    assert [i for i, _ in record.chunks] == [0, 2, 15]  # 4 MiB chunks; all-zero chunks not stored
    assert record.bytes_read <= 8 * MiB  # sparse: only allocated extents are read
    for out_fmt in ("raw", "qcow2"):
        restored = restore_disk(repo, record, tmp_path / "out" / f"data.{out_fmt}", out_fmt)
        assert same_content(image, Path(restored.path))
    assert not list((tmp_path / "out").glob("*.partial"))


def test_second_export_stores_only_new_chunks(tmp_path: Path, repo: Repository) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.truncate(32 * MiB)
        fh.write(os.urandom(8 * MiB))
    first = export_image(repo, device="d", image=str(image))
    with open(image, "r+b") as fh:
        fh.seek(20 * MiB)
        fh.write(os.urandom(MiB))
    second = export_image(repo, device="d", image=str(image))
    assert first.bytes_new >= 8 * MiB  # random data does not compress
    assert MiB <= second.bytes_new < 2 * MiB  # only the changed chunk was stored again


def test_user_backing_chain_and_compressed_clusters(tmp_path: Path, repo: Repository) -> None:
    base = tmp_path / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    qemu_io(base, "qcow2", "write -P 0x01 0 6M")
    packed = tmp_path / "packed.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(base), str(packed)], check=True)
    top = tmp_path / "vm.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(packed), "-F", "qcow2", str(top)], check=True
    )
    qemu_io(top, "qcow2", "write -P 0x02 1M 1M")
    record = export_image(repo, device="d", image=str(top))
    restored = restore_disk(repo, record, tmp_path / "r.raw", "raw")
    assert same_content(top, Path(restored.path))


def test_restore_detects_damaged_chunk(tmp_path: Path, repo: Repository) -> None:
    image = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "8M"], check=True)
    qemu_io(image, "raw", "write -P 0x42 0 1M")
    record = export_image(repo, device="d", image=str(image))
    chunk = Path(repo.target.full(repo.chunk_path(record.chunks[0][1])))
    import zstandard

    chunk.write_bytes(zstandard.ZstdCompressor().compress(b"\x43" * (4 * MiB)))
    with pytest.raises(ChecksumMismatch, match="chunk 0 of disk 'd'"):
        restore_disk(repo, record, tmp_path / "r.raw", "raw")
    assert not (tmp_path / "r.raw").exists() and not (tmp_path / "r.raw.partial").exists()
    chunk.unlink()
    with pytest.raises(BackupSetError, match="missing"):
        restore_disk(repo, record, tmp_path / "r.raw", "raw")


def test_restore_is_thin_inside_chunks(tmp_path: Path, repo: Repository) -> None:
    """Trimmed or never-written space inside a stored chunk comes back as holes, not written zeros."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.truncate(16 * MiB)
        fh.seek(MiB)
        fh.write(os.urandom(64 * 1024))  # one small write in the first chunk
    record = export_image(repo, device="d", image=str(image))
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()
    assert restored.stat().st_blocks * 512 <= 256 * 1024  # ~64 KiB allocated, not the whole 4 MiB chunk


def test_two_vms_cloned_from_one_template_share_chunks(tmp_path: Path, repo: Repository) -> None:
    template = tmp_path / "template.raw"
    with open(template, "wb") as fh:
        fh.truncate(32 * MiB)
        fh.write(os.urandom(24 * MiB))
    clones = []
    for name in ("a", "b"):
        clone = tmp_path / f"{name}.qcow2"
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "raw", str(clone)]
        subprocess.run(create, check=True)
        qemu_io(clone, "qcow2", f"write -P 0x{ord(name):x} 28M 1M")  # each clone's own data
        clones.append(export_image(repo, device="vda", image=str(clone)))
    assert clones[0].bytes_new >= 24 * MiB
    assert clones[1].bytes_new < MiB  # only its own chunk (compresses well) is new


def test_trimmed_blocks_cost_nothing_and_restore_as_holes(tmp_path: Path, repo: Repository) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    qemu_io(image, "qcow2", "write -P 0x5a 0 16M", "discard 4M 8M")  # the guest trimmed the middle
    record = export_image(repo, device="d", image=str(image))
    assert [i for i, _ in record.chunks] == [0, 3]
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert same_content(image, restored)
    assert restored.stat().st_blocks * 512 <= 8 * MiB + 256 * 1024


def test_restore_reads_each_distinct_chunk_once(tmp_path: Path, repo: Repository) -> None:
    image = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "32M"], check=True)
    qemu_io(image, "raw", "write -P 0x77 0 32M")  # eight identical chunks
    record = export_image(repo, device="d", image=str(image))
    assert len(record.chunks) == 8 and len({d for _, d in record.chunks}) == 1
    reads = []
    original = repo.get_chunk  # count reads, do not fake them
    repo.get_chunk = lambda digest, *a, **kw: reads.append(digest) or original(digest, *a, **kw)
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert len(reads) == 1 and restored.read_bytes() == image.read_bytes()


def test_an_oversized_manifest_is_refused_before_it_is_parsed(
    tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest grown past the set store's bound (here lowered to a little above the real one) is a
    damaged set: never parsed, listed as incomplete, and loading it names the size."""
    import datetime as dt

    from hotvm.formats.manifest import Manifest, new_backup_id
    from hotvm.formats.repository import ImageSets
    from hotvm.formats.setstore import DamagedManifest

    image = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "4M"], check=True)
    qemu_io(image, "raw", "write -P 0x5a 0 1M")
    record = export_image(repo, device="data", image=str(image))
    now = dt.datetime.now(dt.UTC)
    backup_id = new_backup_id(now)
    manifest = Manifest(backup_id=backup_id, vm="web01", host="h", driver="qemu", started_at=now,
                        completed_at=now, disks=[record])
    repo.commit_manifest(manifest)
    assert repo.latest("web01").backup_id == backup_id
    path = f"{repo.set_dir('web01', backup_id)}/manifest.json"
    body = repo.read_file(path)
    monkeypatch.setattr(ImageSets, "max_manifest_bytes", len(body) + 1000)
    repo.write_file(path, body + b" " * 2000)  # still valid JSON, with a valid checksum
    [entry] = repo.list_sets("web01")
    assert not entry.complete
    with pytest.raises(DamagedManifest, match="larger than the [0-9]+ bytes"):
        repo.load_manifest("web01", backup_id)
    with pytest.raises(BackupSetError, match="no complete backup of VM 'web01'"):
        repo.latest("web01")


@pytest.fixture(params=["direct", "buffered"])
def restore_dir(request: pytest.FixtureRequest, tmp_path: Path):
    """Where a disk is restored: a file system that takes O_DIRECT (the restore writes past the page
    cache) or a tmpfs, which refuses it (every write goes through the page cache)."""
    if request.param == "direct":
        from hotvm.formats.directio import DIRECT_FS, file_system_type

        if file_system_type(tmp_path) not in DIRECT_FS:
            pytest.skip("tmp_path is not on a local disk file system (ext4, xfs, ...)")
        yield tmp_path / "out"
        return
    with mounted_tmpfs(tmp_path / "tmpfs", "64m") as mount:
        yield mount


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The file's allocated ranges (SEEK_DATA/SEEK_HOLE): where it is not a hole."""
    out, fd, pos = [], os.open(path, os.O_RDONLY), 0
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def test_restore_is_identical_and_thin_whichever_way_it_writes(
    tmp_path: Path, repo: Repository, restore_dir: Path
) -> None:
    """Zero chunks and zero 64 KiB blocks come back as holes and every byte as it was, whether the restore
    writes O_DIRECT or through the page cache, with an odd-sized last chunk (not block-aligned) and a
    chunk stored twice (one object, two places)."""
    image = tmp_path / "disk.raw"
    same = os.urandom(4 * MiB)
    with open(image, "wb") as fh:
        fh.truncate(20 * MiB + 1536)  # a 4 MiB + 1536 byte last chunk
        fh.write(same)  # chunk 0; chunk 1 stays a hole
        fh.seek(8 * MiB)
        fh.write(os.urandom(MiB) + bytes(64 * 1024) + os.urandom(3 * MiB - 64 * 1024))  # chunk 2
        fh.seek(12 * MiB)
        fh.write(bytes(4 * MiB))  # chunk 3: written zeros (allocated, all zero)
        fh.write(same[: 2 * MiB])  # chunk 4 starts like chunk 0
        fh.seek(20 * MiB)
        fh.write(os.urandom(1536))  # the odd tail
    record = export_image(repo, device="d", image=str(image))
    assert sorted(i for i, _ in record.chunks) == [0, 2, 4, 5]
    restored = Path(restore_disk(repo, record, restore_dir / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()
    ranges = data_ranges(restored)
    holes = [(4 * MiB, 8 * MiB), (9 * MiB, 9 * MiB + 64 * 1024), (12 * MiB, 16 * MiB), (18 * MiB, 20 * MiB)]
    for lo, hi in holes:
        assert all(end <= lo or start >= hi for start, end in ranges), (lo, hi, ranges)
    assert restored.stat().st_blocks * 512 <= 12 * MiB + 64 * 1024


def test_a_restore_with_an_identical_chunk_in_two_places_writes_both(
    tmp_path: Path, repo: Repository, restore_dir: Path
) -> None:
    image = tmp_path / "disk.raw"
    block = os.urandom(4 * MiB)
    with open(image, "wb") as fh:
        fh.truncate(16 * MiB)
        fh.write(block)
        fh.seek(12 * MiB)
        fh.write(block)
    record = export_image(repo, device="d", image=str(image))
    assert len(record.chunks) == 2 and len({d for _, d in record.chunks}) == 1
    restored = Path(restore_disk(repo, record, restore_dir / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()


def test_a_raw_image_exports_as_qemu_img_maps_it(tmp_path: Path, repo: Repository) -> None:
    """A raw image with its format given is mapped by the file system (SEEK_DATA/SEEK_HOLE, no qemu-img
    process): the same chunks and image digest as the same disk exported through qemu-img (as qcow2), and
    only its data read."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.truncate(24 * MiB + 4096 + 512)
        for offset in (0, 5 * MiB + 12345, 17 * MiB, 24 * MiB):
            fh.seek(offset)
            fh.write(os.urandom(300 * 1024 if offset < 24 * MiB else 4608))
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)], check=True)
    raw = export_image(repo, device="d", image=str(image), fmt="raw")
    mapped = export_image(repo, device="d", image=str(qcow2), fmt="qcow2")
    assert raw.virtual_size == mapped.virtual_size == image.stat().st_size
    assert raw.chunks == mapped.chunks and raw.digest == mapped.digest
    assert raw.bytes_read <= 4 * 320 * 1024
    restored = Path(restore_disk(repo, raw, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()


def test_incompressible_chunks_are_still_verified_and_damage_is_caught(
    tmp_path: Path, repo: Repository
) -> None:
    """Random data is stored as raw zstd blocks, which a restore reads straight into its buffer: the bytes
    still come back exact, a flipped payload byte is still a ChecksumMismatch (and no file is left), and
    a frame laid out differently (a content checksum, here) is read the usual way."""
    import zstandard

    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.write(os.urandom(8 * MiB + 300 * 1024))
    record = export_image(repo, device="d", image=str(image))
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()
    restored.unlink()

    last = Path(repo.target.full(repo.chunk_path(record.chunks[-1][1])))
    plain = zstandard.ZstdDecompressor().decompress(last.read_bytes())
    last.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(plain))
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()
    restored.unlink()

    first = Path(repo.target.full(repo.chunk_path(record.chunks[0][1])))
    frame = bytearray(first.read_bytes())
    frame[len(frame) // 2] ^= 0x01  # inside a raw block's payload: the layout stays valid
    first.write_bytes(bytes(frame))
    with pytest.raises(ChecksumMismatch, match="chunk 0 of disk 'd'"):
        restore_disk(repo, record, tmp_path / "r.raw", "raw")
    assert not (tmp_path / "r.raw").exists() and not (tmp_path / "r.raw.partial").exists()


def python_source(size: int) -> bytes:
    """Real text (the standard library's own source): compresses to about a quarter with zstd -1."""
    out = bytearray()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= size:
            return bytes(out[:size])
    raise AssertionError("not enough source")


def stored_frame(repo: Repository, digest: str) -> bytes:
    return Path(repo.target.full(repo.chunk_path(digest))).read_bytes()


def test_incompressible_chunks_are_stored_without_compression_and_read_by_any_zstd(
    tmp_path: Path, repo: Repository
) -> None:
    """Random chunks are stored as raw-block zstd frames (no compressor run over them): a restore reads
    them with one scatter read straight into its buffer, plain zstandard and the zstd tool decode them,
    and they are no larger than what zstd itself would have written."""
    import zstandard

    from hotvm.formats.rawframe import raw_layout

    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(8 * MiB + 300 * 1024))
    record = export_image(repo, device="d", image=str(image))
    content = image.read_bytes()
    for index, digest in record.chunks:
        plain = content[index * 4 * MiB : (index + 1) * 4 * MiB]
        frame = stored_frame(repo, digest)
        assert raw_layout(frame[:32], len(frame), len(plain)) is not None
        assert len(frame) <= len(zstandard.ZstdCompressor(level=1).compress(plain))
        assert zstandard.ZstdDecompressor().decompress(frame) == plain
        assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == plain  # no size needed
        tool = subprocess.run(["zstd", "-d", "-c"], input=frame, capture_output=True, check=True)
        assert tool.stdout == plain
        out = memoryview(bytearray(4 * MiB))
        assert repo.read_raw_chunk(digest, out, len(plain)) == plain  # the preadv path applies
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == content


def test_compressible_and_partly_compressible_chunks_are_compressed(tmp_path: Path, repo: Repository) -> None:
    """Text is compressed; so is a chunk of 3.5 MiB random bytes and 0.5 MiB text (zstd saves 9 % of it),
    and one with its text in the middle; a chunk with a few bytes of text in random data is not worth it."""
    from hotvm.formats.rawframe import raw_layout

    text = python_source(2 * MiB)
    chunks = [
        text[: 4 * MiB] + text[: 2 * MiB],
        os.urandom(3 * MiB + MiB // 2) + text[: MiB // 2],
        os.urandom(MiB + MiB // 2) + text[: MiB // 2] + os.urandom(2 * MiB),
        os.urandom(2 * MiB) + text[:4096] + os.urandom(2 * MiB - 4096),
    ]
    image = tmp_path / "disk.raw"
    image.write_bytes(b"".join(chunks))
    record = export_image(repo, device="d", image=str(image))
    frames = [stored_frame(repo, digest) for _, digest in record.chunks]
    assert len(frames[0]) < 2 * MiB
    for frame in frames[1:3]:
        assert raw_layout(frame[:32], len(frame), 4 * MiB) is None and len(frame) < 0.95 * 4 * MiB
    assert raw_layout(frames[3][:32], len(frames[3]), 4 * MiB) is not None
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()


def test_holes_inside_a_chunk_read_as_zeros_whatever_the_worker_read_before(
    tmp_path: Path, repo: Repository
) -> None:
    """The unallocated parts of a chunk come back as zeros even after a chunk of random data went through
    the same worker (one worker: every chunk in turn), whatever buffer it reads into."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.write(os.urandom(8 * MiB))
        fh.seek(8 * MiB + MiB)
        fh.write(os.urandom(MiB))
        fh.seek(16 * MiB - 4096)
        fh.write(os.urandom(4096))
    record = export_image(repo, device="d", image=str(image), workers=1)
    assert [i for i, _ in record.chunks] == [0, 1, 2, 3]
    restored = Path(restore_disk(repo, record, tmp_path / "r.raw", "raw").path)
    assert restored.read_bytes() == image.read_bytes()
