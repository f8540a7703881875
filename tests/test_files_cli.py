"""File sets without a VM: contents encrypted and deduplicated like disk chunks, the catalog's queries,
and restore's refusal to overwrite. (The flow, the CLI against a running VM, hybrid restore and prune are
in test_files_backup.py.)"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from fs_images import Node, PartSpec, build_disk

from hotvm.config import Keep, TargetConfig
from hotvm.credentials import encryption_key
from hotvm.errors import HotvmError
from hotvm.files.blockdev import open_image
from hotvm.files.browse import open_view, resolve_set, sync_catalog
from hotvm.files.catalog import Catalog
from hotvm.files.filesets import FileSetManifest, FileSets, VolumeRecord
from hotvm.files.fs import open_filesystem
from hotvm.files.restore import restore_entries
from hotvm.files.scan import scan_volume
from hotvm.files.volumes import find_volumes
from hotvm.formats.manifest import utcnow
from hotvm.formats.repository import Repository
from hotvm.prune import PrunePolicy, prune_repository
from targets import open_target

KEY_ENV = "HOTVM_TEST_FILES_KEY"
SECRET = b"the launch codes are 0000 " * 40


def back_up(
    repo: Repository, image: Path, backup_id: str, previous: FileSetManifest | None
) -> FileSetManifest:
    """The scan_files + finish_files steps on one whole disk, without the VM around them."""
    fsets = FileSets(repo)
    records = []
    with open_image(image, "raw") as source:
        for volume in find_volumes(source, "vda"):
            base = fsets.read_entries(previous, previous.volume(volume.key)) if previous else None
            with open_filesystem(source, volume) as fs:
                result = scan_volume(repo, fs, base)
                record = VolumeRecord(
                    key=volume.key, device="vda", name=volume.name, fstype=fs.fstype,
                    entries=f"{volume.key}.e", entry_count=len(result.entries), chunks=result.chunks,
                    frozen_at=utcnow(), stats=result.stats,
                )  # fmt: skip
            fsets.write_volume("vm1", backup_id, record, result.entries)
            records.append(record)
    manifest = FileSetManifest(
        backup_id=backup_id, vm="vm1", host="h", started_at=utcnow(), completed_at=utcnow(), volumes=records,
        incremental_from=previous.backup_id if previous else None,
    )  # fmt: skip
    return fsets.commit_manifest(manifest)


def test_file_contents_are_encrypted_deduplicated_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "correct horse battery staple")
    monkeypatch.setenv("HOTVM_CATALOG_DIR", str(tmp_path / "catalog"))
    image = build_disk(tmp_path / "d.raw", [PartSpec("ext4", 16, [
        Node("/secret.txt", SECRET, mode=0o600, uid=5, gid=6, mtime=1_700_000_000),
        Node("/copy/secret-copy.txt", SECRET, mtime=1_700_000_002),
        Node("/large.bin", SECRET * 2000, mtime=1_700_000_004),
    ])], table="none")  # fmt: skip
    config = TargetConfig(name="enc", url=f"file://{tmp_path}/target", encryption_key_env=KEY_ENV)
    repo = Repository(open_target(config), encryption_key(config))
    repo.ensure()
    first = back_up(repo, image, "20260101T000000Z-0001", None)
    stats = first.volumes[0].stats
    assert first.chunk_hash == "keyed-blake3"
    assert (stats.files_seen, stats.files_stored) == (3, 2)  # the copy shares the original's content
    for path in (tmp_path / "target").rglob("*"):
        if path.is_file():
            assert b"launch codes" not in path.read_bytes(), path  # contents and entry lists are sealed
            assert b"secret.txt" not in path.read_bytes(), path

    again = back_up(repo, image, "20260102T000000Z-0002", first)
    assert (again.volumes[0].stats.files_read, again.volumes[0].stats.bytes_new) == (0, 0)

    ref = resolve_set(repo, "vm1", None)
    assert ref.backup_id == again.backup_id
    out = tmp_path / "out"
    with open_view(repo, ref) as view:
        report = restore_entries(view.entries, view.read, out)
        assert report.files == 3
        with pytest.raises(HotvmError, match="already exist"):
            restore_entries(view.entries, view.read, out)
    restored = out / "vda-disk" / "secret.txt"
    assert restored.read_bytes() == SECRET
    st = restored.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns) == (0o600, 5, 6, 1_700_000_000 * 10**9)
    assert (out / "vda-disk" / "large.bin").read_bytes() == SECRET * 2000

    with Catalog.for_repository(repo) as catalog:
        assert sync_catalog(catalog, repo)["indexed"] == 2
        hits = catalog.find("vm1", "secret*.txt")
        assert {(h["path"], h["backup_id"]) for h in hits} == {
            (p, b) for p in ("/vda-disk/secret.txt", "/vda-disk/copy/secret-copy.txt")
            for b in (first.backup_id, again.backup_id)
        }  # fmt: skip
        at = first.completed_at + dt.timedelta(microseconds=1)
        assert {h["backup_id"] for h in catalog.find("vm1", "secret*.txt", at=at)} == {first.backup_id}
        assert [r["name"] for r in catalog.ls("vm1", first.backup_id, "/vda-disk/copy")] == [
            "secret-copy.txt"
        ]
        FileSets(repo).target.delete_tree(FileSets.set_dir("vm1", first.backup_id))  # pruned elsewhere
        assert sync_catalog(catalog, repo)["dropped"] == 1
        assert {h["backup_id"] for h in catalog.find("vm1", "secret.txt")} == {again.backup_id}
    assert os.path.exists(tmp_path / "catalog")


def test_prune_keeps_file_sets_by_each_vms_files_policy(tmp_path: Path) -> None:
    """prune honours the `files.keep` of the VM's policy; without one, Table 7.3's 31 days apply."""
    image = build_disk(tmp_path / "d.raw", [PartSpec("ext4", 16, [Node("/a.txt", b"a" * 100)])], table="none")
    repo = Repository(open_target(TargetConfig(name="t", url=f"file://{tmp_path}/target")))
    repo.ensure()
    previous = None
    for day in (1, 2, 3):
        previous = back_up(repo, image, f"202601{day:02d}T000000Z-000{day}", previous)
    later = utcnow() + dt.timedelta(days=40)  # every set is older than 31 days by then

    def kept(files_keep: Keep | dict[str, Keep] | None) -> list[bool]:
        report = prune_repository(repo, PrunePolicy(Keep(last=1), files=files_keep), dry_run=True, now=later)
        return [outcome.keep for outcome in report.sweep.file_sets]

    assert kept(None) == [False, False, True]  # 31 days: only the newest (never removed) stays
    assert kept({"vm1": Keep(last=2)}) == [False, True, True]
    assert kept({"other": Keep(last=3)}) == [False, False, True]  # another VM's policy is not vm1's
    assert kept(Keep(last=3)) == [True, True, True]
