"""Fuzz: a manifest or disk record mutated on the target (bit rot, or someone who also rewrites its checksum)
never crashes restore or check with a traceback, never makes them allocate without bound, and — when only
the file changed (rot) — never restores bytes other than the ones backed up."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hotvm.check import check_repository
from hotvm.config import TargetConfig
from hotvm.errors import HotvmError
from hotvm.formats.export import export_image
from hotvm.formats.manifest import DiskRecord, Manifest
from hotvm.formats.repository import Repository, new_backup_id
from hotvm.formats.restore import restore_disk
from targets import open_target

CHUNK = 64 * 1024
SIZE = 5 * CHUNK + 1024  # a short last chunk (raw images are whole 512-byte sectors)
VM = "fuzz-vm"

INTS = [-1, 0, 1, 4095, 4096, CHUNK - 1, CHUNK + 1, CHUNK * 2, CHUNK // 2, SIZE - 1, SIZE + 1, 2**31,
        2**46 + 1, 2**62, 2**63 - 1, 2**64]
TEXTS = ["", ".", "..", "../../../tmp/x", "a/b", "x\x00y", "0" * 64, "f" * 63, "F" * 64, "é", "vms",
         "20260101T000000Z-abcd", "20260101T000000Z-../x"]
OTHER = [None, 1.5, True, [], {}, [[0]], [[0, "0" * 64, 1]], [[-1, "0" * 64]], [[99, "0" * 64]],
         [[0, "0" * 64, 0, 10]], [[0, "0" * 64, CHUNK - 1, 2]], [[0, "0" * 64, 4, -4]], [[0, "0" * 64, 0, 0]],
         [[0, "0" * 64, 8, 8], [0, "0" * 64, 0, 16]], [[5, "0" * 64, 0, 1024]]]
VALUES = st.sampled_from(INTS + TEXTS + OTHER)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every field path of a JSON document (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:4]):
            out += _paths(value, (*prefix, index))
    return out


def _set(doc: object, path: tuple, value: object) -> object:
    doc = json.loads(json.dumps(doc))
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return doc


class _Setup(tuple):
    def __new__(cls, *items: object) -> _Setup:
        return super().__new__(cls, items)

    def __repr__(self) -> str:  # not the disk's bytes in every failure report
        return "<fuzz repository>"


@pytest.fixture(scope="module")
def repository():
    work = Path(tempfile.mkdtemp(prefix="hotvm-fuzz-"))
    image = work / "disk.raw"
    with open(image, "wb") as fh:
        fh.truncate(SIZE)
        fh.write(os.urandom(2 * CHUNK))
        fh.seek(4 * CHUNK)
        fh.write(os.urandom(CHUNK + 1024))
    repo = Repository(open_target(TargetConfig(name="fuzz", url=f"file://{work}/target")))
    backup_id = new_backup_id()
    repo.ensure()
    record = export_image(repo, device="d0", image=str(image), fmt="raw", chunk_size=CHUNK)
    repo.write_disk_record(VM, backup_id, record)
    now = dt.datetime.now(dt.UTC)
    manifest = Manifest(backup_id=backup_id, vm=VM, host="h", driver="qemu", disks=[record],
                        started_at=now, completed_at=now)
    repo.commit_manifest(manifest)
    set_dir = work / "target" / repo.set_dir(VM, backup_id)
    yield _Setup(repo, backup_id, set_dir, image.read_bytes(), work)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def patched(repository):
    """An incremental (format 3) set over the fuzz repository's: small writes in chunks 0, 1 are patches."""
    repo, backup_id, _, _, work = repository
    image = work / "disk.raw"
    dirty = [(4096, 4096), (CHUNK + 8192, 4096)]
    with open(image, "r+b") as fh:
        for offset, length in dirty:
            fh.seek(offset)
            fh.write(os.urandom(length))
    parent = repo.load_manifest(VM, backup_id).disks[0]
    record = export_image(repo, device="d0", image=str(image), fmt="raw", chunk_size=CHUNK, previous=parent,
                          dirty=dirty)  # fmt: skip
    assert [e[0] for e in record.chunks[:4]] == [0, 0, 1, 1] and len(record.chunks[1]) == 4
    child = new_backup_id(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    repo.write_disk_record(VM, child, record)
    now = dt.datetime.now(dt.UTC)
    repo.commit_manifest(Manifest(backup_id=child, vm=VM, host="h", driver="qemu", disks=[record],
                                  started_at=now, completed_at=now))  # fmt: skip
    return _Setup(repo, child, work / "target" / repo.set_dir(VM, child), image.read_bytes(), work)


def _restore_all(repo: Repository, backup_id: str, work: Path) -> dict[str, bytes] | None:
    """The restored disks, or None if restore refused with a HotvmError (anything else fails the test)."""
    out = Path(tempfile.mkdtemp(dir=work))
    try:
        manifest = repo.load_manifest(VM, backup_id)
        restored = {}
        for disk in manifest.disks:
            dest = out / f"{len(restored)}.raw"
            restore_disk(repo, disk, dest, "raw", workers=2)
            with open(dest, "rb") as fh:
                restored[disk.device] = fh.read(SIZE + 1)  # never read a huge sparse file whole
        return restored
    except HotvmError:
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _mutate(path: Path, original: bytes, data: st.DataObject, model: type) -> tuple[object, bool]:
    doc = json.loads(original)
    field = data.draw(st.sampled_from(_paths(doc)), label="field")
    mutated = _set(doc, field, data.draw(VALUES, label="value"))
    forged = data.draw(st.booleans(), label="checksum recomputed")
    if forged:  # someone who rewrites the checksum too (only encryption would stop them)
        try:
            model_obj = model.model_validate(mutated)
            mutated["checksum"] = model_obj.computed_checksum()
        except (ValueError, TypeError):
            pass
    path.write_text(json.dumps(mutated))
    return field, forged


def _mutated_manifest_is_refused_or_restores_right(made: tuple, data) -> None:  # noqa: ANN001 - st.data()
    """Mutate the set's manifest (rot, or forged with a recomputed checksum): restore refuses it or gives
    the disk's own bytes, and check flags what restore refused."""
    repo, backup_id, set_dir, disk_bytes, work = made
    manifest_path = set_dir / "manifest.json"
    original = manifest_path.read_bytes()
    try:
        field, forged = _mutate(manifest_path, original, data, Manifest)
        fresh = Repository(repo.target)
        restored = _restore_all(fresh, backup_id, work)
        event(f"{'forged' if forged else 'rot'}: {'restored' if restored is not None else 'refused'}")
        if restored is not None and not forged:
            assert restored == {"d0": disk_bytes}, f"rot in {field} restored other bytes"
        report = check_repository(fresh, read_data=True, workers=2)
        if not forged and restored is None:
            assert not report.ok, f"restore refused the set but check found nothing wrong ({field})"
    finally:
        manifest_path.write_bytes(original)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifest_never_crashes_and_never_restores_wrong_bytes(repository, data) -> None:
    _mutated_manifest_is_refused_or_restores_right(repository, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_patched_manifest_never_crashes_and_never_restores_wrong_bytes(patched, data) -> None:
    """The same for a format 3 set with patch entries: offsets, lengths and order are hostile input too."""
    _mutated_manifest_is_refused_or_restores_right(patched, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_disk_journal_is_used_only_when_intact(repository, data) -> None:
    repo, backup_id, set_dir, _, _ = repository
    journal = set_dir / "disks" / "d0.json"
    original = journal.read_bytes()
    try:
        _, forged = _mutate(journal, original, data, DiskRecord)
        record = Repository(repo.target).read_disk_record(VM, backup_id, "d0")
        if record is not None and not forged:
            assert record == DiskRecord.model_validate_json(original).model_copy(update={"checksum": None})
    finally:
        journal.write_bytes(original)
