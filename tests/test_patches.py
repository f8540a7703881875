"""Format 3 patches on real images (qemu-img, files on disk): every reader of a set gets the same bytes.

Spread small changes are stored as patches over the parent's 4 MiB chunk (formats/patchplan.py); each set
is still a complete restorable point: restore, check, prune, copy, file-level reads and the instant-restore
chunk source all compose the same image. An older (format 2) repository is read and extended.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from repo_helpers import commit, restored

from hotvm import prune
from hotvm.check import check_repository
from hotvm.config import TargetConfig
from hotvm.copy import copy_repository
from hotvm.errors import HotvmError
from hotvm.files.blockdev import open_backup_disk
from hotvm.formats.export import export_image
from hotvm.formats.manifest import MANIFEST_FORMAT, DiskRecord, Manifest, Patch, Piece
from hotvm.formats.patchplan import MAX_PATCHES_PER_CHUNK, plan_chunk
from hotvm.formats.repository import Repository
from hotvm.instant.chunks import ChunkSource
from hotvm.tape.copy import catalogs_from_scan, copy_to_tape, restore_from_tape, scan_library
from hotvm.tape.drive import VirtualLibrary
from targets import open_target

MiB, K64 = 1 << 20, 64 << 10
CHUNK = 4 * MiB
SIZE = 32 * MiB
FIXTURE = Path(__file__).parent / "data" / "format2-repo"
FIXTURE_SHA256 = "b6446259a07bd7f294ff2d3072dc04e2bb79c19fc5c36a1f96a19aa75b3e6774"


def open_repo(path: Path, name: str = "t") -> Repository:
    repo = Repository(open_target(TargetConfig(name=name, url=f"file://{path}")), remember=False)
    repo.ensure()
    return repo


def spread_writes(
    data: bytearray, rng: random.Random, count: int, zeros: bool = False
) -> list[tuple[int, int]]:
    """`count` random 64 KiB writes (some of zeros: a guest's trim) in place; the dirty extents."""
    dirty = []
    for k in range(count):
        offset = rng.randrange(SIZE // K64) * K64
        data[offset : offset + K64] = bytes(K64) if zeros and k % 5 == 0 else os.urandom(K64)
        dirty.append((offset, K64))
    return dirty


def new_plain_bytes(record: DiskRecord, parent: DiskRecord) -> int:
    """Plain bytes of the entries this set added to its parent's: what the incremental stored."""
    old = set(parent.chunks)
    return sum(n for (i, d, n), entry in zip(record.refs(), record.chunks, strict=True) if entry not in old)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Repository, list[Manifest], list[bytes]]:
    """A VM's full set, then five incrementals of 6 spread 64 KiB writes each (some overlapping, some of
    zeros), and one that rewrites half a chunk: the image of every point and its manifest."""
    repo = open_repo(tmp_path / "target")
    rng = random.Random(15)
    data = bytearray(os.urandom(SIZE))
    data[20 * MiB : 28 * MiB] = bytes(8 * MiB)  # two zero chunks: patches over no base
    image = tmp_path / "disk.raw"
    image.write_bytes(data)
    record = export_image(repo, device="vda", image=str(image), fmt="raw")
    manifests, points = [commit(repo, "db01", 0, record)], [bytes(data)]
    dirty: list[tuple[int, int]] = []
    for n in range(1, 6):
        again = dirty[:4] if n == 3 else []  # the same blocks again: their patches replaced, not stacked
        dirty = spread_writes(data, rng, 6, zeros=True)
        for offset, length in again:
            data[offset : offset + length] = os.urandom(length)
        dirty += again
        image.write_bytes(data)
        parent = manifests[-1].disks[0]
        record = export_image(repo, device="vda", image=str(image), fmt="raw", previous=parent, dirty=dirty)
        if n <= 2:  # before any chunk reaches MAX_PATCHES_PER_CHUNK: stored <= 2x changed
            assert new_plain_bytes(record, parent) <= 2 * len(dirty) * K64
        assert all(len(p.patches) <= MAX_PATCHES_PER_CHUNK for p in record.pieces())  # then whole again
        manifests.append(commit(repo, "db01", n, record))
        points.append(bytes(data))
    data[CHUNK : CHUNK + 2 * MiB] = os.urandom(2 * MiB)  # half a chunk: stored whole again
    image.write_bytes(data)
    parent = manifests[-1].disks[0]
    dirty = [(CHUNK, 2 * MiB)]
    record = export_image(repo, device="vda", image=str(image), fmt="raw", previous=parent, dirty=dirty)
    whole = repo.chunk_id(data[CHUNK : 2 * CHUNK])
    assert [e for e in record.chunks if e[0] == 1] == [(1, whole)]
    manifests.append(commit(repo, "db01", 6, record))
    points.append(bytes(data))
    return repo, manifests, points


def test_spread_changes_are_patches_and_every_point_restores(chain, tmp_path: Path) -> None:
    repo, manifests, points = chain
    assert all(m.format_version == MANIFEST_FORMAT == 3 for m in manifests)
    assert any(len(e) == 4 for e in manifests[3].disks[0].chunks)  # patches written
    assert any(p.base is None and p.patches for p in manifests[3].disks[0].pieces())  # on a zero chunk
    for n, (manifest, expected) in enumerate(zip(manifests, points, strict=True)):
        assert restored(repo, manifest.disks[0], tmp_path / f"r{n}.raw") == expected, f"point {n}"


def test_every_reader_composes_patches(chain, tmp_path: Path) -> None:
    repo, manifests, points = chain
    record, expected = manifests[5].disks[0], points[5]
    # file-level browsing of image sets and the instant-restore export read the same bytes
    disk = open_backup_disk(repo, record)
    source = ChunkSource(repo.target, None, {"vda": record}, chunk_hash=repo.chunk_hash)
    rng = random.Random(1)
    for _ in range(40):
        offset, length = rng.randrange(SIZE - MiB), rng.randrange(1, 3 * K64)
        assert disk.read(offset, length) == expected[offset : offset + length]
        assert bytes(source.read("vda", offset, length)) == expected[offset : offset + length]
    # check: every set's chunk list matches its digest, every object is there and intact
    report = check_repository(repo, read_data=True)
    assert [p for s in report.sets for p in s.problems] == [] and report.problems == []
    # copy to a second target: every object a set references (bases and patches) goes along
    copy_repository(repo, open_target(TargetConfig(name="off", url=f"file://{tmp_path}/offsite")))
    offsite = open_repo(tmp_path / "offsite", "off")
    assert restored(offsite, offsite.load_manifest("db01", manifests[5].backup_id).disks[0],
                    tmp_path / "off.raw") == expected  # fmt: skip
    # prune: the full set and the first incrementals go; the later sets keep the bases they patch
    for m in manifests[:4]:
        shutil.rmtree(Path(repo.target.display().removeprefix("file://")) / repo.set_dir(m.vm, m.backup_id))
    report = prune.sweep(repo, dry_run=False, chunk_grace=dt.timedelta(0), set_grace=dt.timedelta(0))
    assert report.chunks_removed > 0
    for n in (4, 5, 6):
        assert restored(repo, manifests[n].disks[0], tmp_path / f"p{n}.raw") == points[n]


def test_hostile_patch_entries_are_refused(chain) -> None:
    _, manifests, _ = chain
    body = json.loads(manifests[3].disks[0].model_dump_json())
    patched = next(i for i, e in enumerate(body["chunks"]) if len(e) == 4)
    index, digest, offset, length = body["chunks"][patched]
    for bad in ([index, digest, CHUNK - 10, 20], [index, digest, -1, 10], [index, digest, offset, 0],
                [index + 10_000, digest, 0, 10]):
        changed = json.loads(json.dumps(body))
        changed["chunks"][patched] = bad
        with pytest.raises(ValueError):
            DiskRecord.model_validate(changed)
    overlapping = json.loads(json.dumps(body))
    overlapping["chunks"].insert(patched + 1, [index, digest, offset, length])
    with pytest.raises(ValueError, match="overlaps"):
        DiskRecord.model_validate(overlapping)
    many = json.loads(json.dumps(body))
    many["chunks"][patched : patched + 1] = [[index, digest, k * 16, 8] for k in range(65)]
    with pytest.raises(ValueError, match="more than 64 patches"):
        DiskRecord.model_validate(many)


def test_format2_repository_restores_and_extends(tmp_path: Path) -> None:
    """tests/data/format2-repo was written by the format-2 code (tests/data/make_format2_repo.py)."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    repo = open_repo(tmp_path / "old", "old")
    (old,) = repo.list_sets("old-vm")
    manifest = repo.load_manifest("old-vm", old.backup_id)
    assert manifest.format_version == 2
    data = restored(repo, manifest.disks[0], tmp_path / "old.raw")
    assert hashlib.sha256(data).hexdigest() == FIXTURE_SHA256
    # an incremental on top of the format 2 set: patches over its chunks, a format 3 set
    changed = bytearray(data)
    changed[5 * MiB : 5 * MiB + K64] = os.urandom(K64)
    changed[9 * MiB + 3 * K64 : 9 * MiB + 4 * K64] = os.urandom(K64)
    (tmp_path / "new.raw").write_bytes(changed)
    dirty = [(5 * MiB, K64), (9 * MiB + 3 * K64, K64)]
    record = export_image(repo, device="vda", image=str(tmp_path / "new.raw"), fmt="raw",
                          previous=manifest.disks[0], dirty=dirty)  # fmt: skip
    assert sum(1 for e in record.chunks if len(e) == 4) == 2
    new = commit(repo, "old-vm", 40, record)
    assert new.format_version == 3
    assert restored(repo, new.disks[0], tmp_path / "new-restored.raw") == changed
    assert restored(repo, manifest.disks[0], tmp_path / "old-again.raw") == data
    assert [p for s in check_repository(repo, read_data=True).sets for p in s.problems] == []


def test_patch_plan_keeps_patches_disjoint_and_bounded() -> None:
    old = Piece(3, "b" * 64, (Patch("1" * 64, 0, K64), Patch("2" * 64, 10 * K64, K64)))
    plan = plan_chunk(old, [(10 * K64 + 100, 10), (20 * K64, K64)], CHUNK)
    assert not plan.whole and plan.base == "b" * 64
    assert plan.kept == (old.patches[0],)  # untouched: kept by name
    assert plan.ranges == ((10 * K64, K64), (20 * K64, K64))  # the touched one is read again, whole
    assert plan_chunk(None, [(0, K64)], CHUNK).base is None  # over a zero chunk
    assert plan_chunk(old, [(0, CHUNK // 2)], CHUNK).whole  # much changed: whole
    many = [(k * 2 * K64, K64) for k in range(MAX_PATCHES_PER_CHUNK + 1)]
    assert plan_chunk(None, many, CHUNK).whole  # too many pieces for one chunk: whole


def test_format2_manifest_without_checksum_is_still_refused(tmp_path: Path) -> None:
    """Format 2 manifests carry checksums: reading format 3 does not turn them into unchecked legacy."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    (path,) = (tmp_path / "old" / "vms" / "old-vm").glob("*/manifest.json")
    body = json.loads(path.read_text())
    body["checksum"] = None
    path.write_text(json.dumps(body))
    repo = open_repo(tmp_path / "old", "old")
    with pytest.raises(HotvmError, match="checksum is missing"):
        repo.load_manifest("old-vm", body["backup_id"])


def test_patched_set_restores_from_tape_alone(tmp_path: Path) -> None:
    """A tape archive carries a set's bases and patches; restore writes them in the tape's order."""
    repo = open_repo(tmp_path / "target")
    data = bytearray(os.urandom(12 * MiB))
    image = tmp_path / "disk.raw"
    image.write_bytes(data)
    first = commit(repo, "db01", 0, export_image(repo, device="vda", image=str(image), fmt="raw"))
    dirty = [(K64, K64), (5 * MiB, K64), (9 * MiB + 7 * K64, K64)]
    for offset, length in dirty:
        data[offset : offset + length] = os.urandom(length)
    image.write_bytes(data)
    parent = first.disks[0]
    record = export_image(repo, device="vda", image=str(image), fmt="raw", previous=parent, dirty=dirty)
    second = commit(repo, "db01", 1, record)
    assert sum(1 for e in second.disks[0].chunks if len(e) == 4) == 3
    library = VirtualLibrary("vtl", f"vtl://{tmp_path / 'vtl'}?media=1&capacity=64MiB")
    copy_to_tape(repo, library, target_name="t", now=dt.datetime(2026, 11, 8, tzinfo=dt.UTC))
    shutil.rmtree(tmp_path / "target")
    catalogs = catalogs_from_scan(scan_library(library))
    result = restore_from_tape(library, catalogs, "db01", second.backup_id, tmp_path / "r", "raw")
    assert Path(result["disks"][0]["path"]).read_bytes() == bytes(data)
