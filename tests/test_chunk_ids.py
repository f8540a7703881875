"""Chunk ids (hotvm/formats/chunkid.py): new repositories name chunks by BLAKE3 (keyed BLAKE3 when
encrypted); a repository keeps the scheme its marker records, so older sha256 / HMAC-SHA256 repositories
keep restoring and keep deduplicating against their own chunks. Real files on disk, real qemu-img images.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

import blake3
import pytest
import zstandard
from repo_helpers import commit, restored

from hotvm.check import check_repository
from hotvm.config import TargetConfig
from hotvm.copy import copy_repository
from hotvm.errors import HotvmError
from hotvm.formats import crypto
from hotvm.formats.export import export_image
from hotvm.formats.manifest import Manifest
from hotvm.formats.repository import MARKER, Repository
from hotvm.tape.copy import catalogs_from_scan, copy_to_tape, restore_from_tape, scan_library
from hotvm.tape.drive import VirtualLibrary
from targets import open_target

MiB = 1 << 20
FIXTURE = Path(__file__).parent / "data" / "format2-repo"
FIXTURE_SHA256 = "b6446259a07bd7f294ff2d3072dc04e2bb79c19fc5c36a1f96a19aa75b3e6774"
KEY = "k" * 20  # a passphrase (scrypt): an encrypted repository


def open_repo(path: Path, key: str | None = None, name: str = "t") -> Repository:
    repo = Repository(open_target(TargetConfig(name=name, url=f"file://{path}")), key, remember=False)
    repo.ensure()
    return repo


def backup(repo: Repository, image: Path, vm: str = "web01", n: int = 0, **incremental) -> Manifest:
    return commit(repo, vm, n, export_image(repo, device="vda", image=str(image), fmt="raw", **incremental))


def stored_chunks(root: Path) -> dict[str, Path]:
    return {p.name: p for p in (root / "chunks").glob("*/*")}


def plain(path: Path) -> bytes:
    return zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=8 * MiB)


def problems(repo: Repository) -> list[str]:
    report = check_repository(repo, read_data=True)
    return [p.detail for s in report.sets for p in s.problems] + [p.detail for p in report.problems]


def disk(tmp_path: Path, size: int = 16 * MiB) -> tuple[Path, bytearray]:
    data = bytearray(os.urandom(size))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)  # a hole
    image = tmp_path / "disk.raw"
    image.write_bytes(data)
    return image, data


def test_a_new_repository_names_chunks_by_blake3_and_restores(tmp_path: Path) -> None:
    image, data = disk(tmp_path)
    repo = open_repo(tmp_path / "repo")
    marker = json.loads((tmp_path / "repo" / MARKER).read_text())
    assert marker["chunk_hash"] == "blake3" and marker["format_version"] == 4
    manifest = backup(repo, image)
    assert manifest.chunk_hash == "blake3"
    chunks = stored_chunks(tmp_path / "repo")
    assert len(chunks) == 3
    for name, path in chunks.items():
        assert blake3.blake3(plain(path)).hexdigest() == name
    assert restored(repo, manifest.disks[0], tmp_path / "r.raw") == data
    assert problems(repo) == []


def test_a_sha256_repository_stays_sha256_and_keeps_deduplicating(tmp_path: Path) -> None:
    """The committed format 2 fixture (sha256 ids): restores, and a new backup names its new chunks by
    sha256, so its unchanged chunks are the old ones (nothing stored twice)."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    repo = open_repo(tmp_path / "old")
    assert repo.chunk_hash == "sha256"
    (old,) = repo.list_sets("old-vm")
    manifest = repo.load_manifest("old-vm", old.backup_id)
    data = restored(repo, manifest.disks[0], tmp_path / "old.raw")
    assert hashlib.sha256(data).hexdigest() == FIXTURE_SHA256
    before = set(stored_chunks(tmp_path / "old"))
    changed = bytearray(data)
    changed[5 * MiB : 6 * MiB] = os.urandom(MiB)  # chunk 1 changes (a full backup: not a patch)
    (tmp_path / "new.raw").write_bytes(changed)
    new = backup(repo, tmp_path / "new.raw", vm="old-vm", n=40)
    assert new.chunk_hash == "sha256"
    after = stored_chunks(tmp_path / "old")
    added = set(after) - before
    assert len(added) == 1 and {d for _, d in new.disks[0].chunks} - added <= before  # dedup kept
    (name,) = added
    assert hashlib.sha256(plain(after[name])).hexdigest() == name
    assert restored(repo, new.disks[0], tmp_path / "new-restored.raw") == changed
    assert json.loads((tmp_path / "old" / MARKER).read_text())["chunk_hash"] == "sha256"  # never rewritten
    assert problems(repo) == []


def test_encrypted_repositories_keyed_blake3_new_hmac_sha256_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, data = disk(tmp_path)
    repo = open_repo(tmp_path / "new", KEY)
    marker = json.loads((tmp_path / "new" / MARKER).read_text())
    assert marker["chunk_hash"] == marker["encryption"]["chunk_id"] == "keyed-blake3"
    manifest = backup(repo, image)
    assert manifest.chunk_hash == "keyed-blake3"
    names = set(stored_chunks(tmp_path / "new"))
    plains = [bytes(data[i * 4 * MiB : (i + 1) * 4 * MiB]) for i in (0, 2, 3)]
    assert not names & {blake3.blake3(p).hexdigest() for p in plains}  # names do not reveal content hashes
    assert names == {repo.chunk_id(p) for p in plains}
    assert restored(repo, manifest.disks[0], tmp_path / "r.raw") == data

    with monkeypatch.context() as m:  # an encrypted repository made by a hotvm before BLAKE3
        m.setattr(crypto, "CHUNK_ID", "hmac-sha256")
        legacy = open_repo(tmp_path / "legacy", KEY)
    legacy = open_repo(tmp_path / "legacy", KEY)  # opened again by this hotvm
    assert legacy.chunk_hash == "hmac-sha256"
    old = backup(legacy, image)
    keys = crypto.open_encryption(KEY, json.loads((tmp_path / "legacy" / MARKER).read_text())["encryption"])
    assert keys is not None and keys.ids != crypto.derive(KEY, marker["encryption"]["kdf"], b"x" * 16).ids
    assert set(stored_chunks(tmp_path / "legacy")) == {
        hmac.new(keys.ids, p, hashlib.sha256).hexdigest() for p in plains
    }
    assert old.chunk_hash == "hmac-sha256"
    assert restored(legacy, old.disks[0], tmp_path / "r2.raw") == data
    assert problems(legacy) == []


def test_a_copy_keeps_its_sources_chunk_ids_and_restores(tmp_path: Path) -> None:
    """An offsite copy is the same repository in a second place: a sha256 repository's copy made by this
    hotvm (which creates BLAKE3 repositories) is sha256 too, restores, and takes further backups that
    dedup against it. A copy into a repository of another scheme is refused, never mixed."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    src = open_repo(tmp_path / "old")
    dst_target = open_target(TargetConfig(name="offsite", url=f"file://{tmp_path / 'copy'}"))
    report = copy_repository(src, dst_target)
    assert report.marker_created and report.chunks_sent == len(stored_chunks(tmp_path / "old"))
    copy = open_repo(tmp_path / "copy", name="offsite")
    assert copy.chunk_hash == "sha256"
    (entry,) = copy.list_sets("old-vm")
    manifest = copy.load_manifest("old-vm", entry.backup_id)
    data = restored(copy, manifest.disks[0], tmp_path / "r.raw")
    assert hashlib.sha256(data).hexdigest() == FIXTURE_SHA256
    assert problems(copy) == []

    open_repo(tmp_path / "blake3", name="b3")
    with pytest.raises(HotvmError, match="holds another hotvm repository"):
        copy_repository(src, open_target(TargetConfig(name="b3", url=f"file://{tmp_path / 'blake3'}")))


def test_a_sha256_repository_restores_from_tape(tmp_path: Path) -> None:
    """The tape carries the repository's marker: its chunk ids are checked with the scheme it records."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    repo = open_repo(tmp_path / "old")
    (old,) = repo.list_sets("old-vm")
    library = VirtualLibrary("vtl", f"vtl://{tmp_path / 'vtl'}?media=1&capacity=64MiB")
    copy_to_tape(repo, library, target_name="t", now=dt.datetime(2026, 12, 8, tzinfo=dt.UTC))
    shutil.rmtree(tmp_path / "old")
    catalogs = catalogs_from_scan(scan_library(library))
    result = restore_from_tape(library, catalogs, "old-vm", old.backup_id, tmp_path / "r", "raw")
    assert hashlib.sha256(Path(result["disks"][0]["path"]).read_bytes()).hexdigest() == FIXTURE_SHA256


def test_a_damaged_or_swapped_blake3_chunk_is_found(tmp_path: Path) -> None:
    image, data = disk(tmp_path)
    repo = open_repo(tmp_path / "repo")
    manifest = backup(repo, image)
    first, second = sorted(stored_chunks(tmp_path / "repo").values())[:2]
    raw = bytearray(first.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # bit rot inside the stored frame
    first.write_bytes(bytes(raw))
    # a valid zstd frame of other content under the second name: only the id check can tell
    second.write_bytes(zstandard.ZstdCompressor().compress(os.urandom(4 * MiB)))
    found = " ".join(problems(repo))
    assert first.name[:16] in found and second.name[:16] in found, found
    assert "2 chunk(s) damaged" in found, found
    with pytest.raises(HotvmError):
        restored(repo, manifest.disks[0], tmp_path / "r.raw")


def test_an_unknown_chunk_id_scheme_is_refused(tmp_path: Path) -> None:
    open_repo(tmp_path / "repo")
    marker = json.loads((tmp_path / "repo" / MARKER).read_text())
    marker["chunk_hash"] = "sha3-512"
    (tmp_path / "repo" / MARKER).write_text(json.dumps(marker))
    with pytest.raises(HotvmError) as err:
        open_repo(tmp_path / "repo", name="nas")
    assert "target 'nas'" in str(err.value) and "sha3-512" in str(err.value)
    assert "upgrade hotvm" in str(err.value.hint)


@pytest.mark.parametrize("kind", ["keyed-blake3", "sha256"])
def test_instant_restore_reads_chunks_by_the_repositorys_scheme(tmp_path: Path, kind: str) -> None:
    """The instant-restore plugin gets the scheme (and for an encrypted repository its derived id key) in
    its bundle and verifies every chunk it serves with it."""
    from hotvm.instant.chunks import open_source
    from hotvm.instant.export import bundle

    if kind == "sha256":
        shutil.copytree(FIXTURE, tmp_path / "repo")
        repo = open_repo(tmp_path / "repo")
        manifest = repo.latest("old-vm")
        data = restored(repo, manifest.disks[0], tmp_path / "r.raw")
    else:
        image, data = disk(tmp_path)
        repo = open_repo(tmp_path / "repo", KEY)
        manifest = backup(repo, image)
    assert repo.chunk_hash == kind
    source = open_source(bundle(repo, manifest, None, 0, 1.0), None)
    device = manifest.disks[0].device
    assert bytes(source.read(device, 0, len(data))) == bytes(data)
