"""One backup as a file tree, whichever kind it is: a file set (entries + stored contents) or an image set
(its disks read on demand through A7's block reader, volumes, file systems). find / ls / restore and the
catalog all go through here, so image backups are browsable with the same commands.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import zstandard

from hotvm.config import Config
from hotvm.errors import BackupSetError, ChecksumMismatch, HotvmError
from hotvm.files.catalog import Catalog
from hotvm.files.filesets import FileSetManifest, FileSets, decompress_bounded
from hotvm.files.scan import entry_dict
from hotvm.formats.manifest import Manifest
from hotvm.formats.repository import Repository
from hotvm.safepath import printable, unprintable


@dataclass(frozen=True)
class SetRef:
    kind: str  # "files" | "image"
    vm: str
    backup_id: str
    completed_at: dt.datetime
    manifest: Any  # FileSetManifest | Manifest


def resolve_set(
    repo: Repository, vm: str, backup_id: str | None = None, at: dt.datetime | None = None
) -> SetRef:
    """--backup ID (a file set or an image set), else the newest file set at or before --at (default now)."""
    fsets = FileSets(repo)
    if backup_id:
        if any(e.backup_id == backup_id for e in fsets.list_sets(vm)):
            m = fsets.load_manifest(vm, backup_id)
            return SetRef("files", m.vm, m.backup_id, m.completed_at, m)
        image = repo.load_manifest(vm, backup_id)  # BackupSetError naming the set if it is not there either
        return SetRef("image", image.vm, image.backup_id, image.completed_at, image)
    latest = fsets.latest(vm, at=at)
    if latest is None:
        when = f" completed by {at:%Y-%m-%d %H:%M}" if at else ""
        raise BackupSetError(
            f"no complete file-level backup of VM '{vm}'{when} on target '{repo.target.name}'",
            f"run 'hotvm files backup {vm}', or give --backup with an image backup id ('hotvm list {vm}')",
        )
    return SetRef("files", latest.vm, latest.backup_id, latest.completed_at, latest)


MAX_CHUNK_BYTES = 64 << 20
"""File contents are stored in chunks of 4 MiB (a pack of small files a little more): a frame that claims
more is damaged or forged, and is refused before it is allocated."""


class ChunkCache:
    """Decompressed chunks, a few at a time: restoring many small files reads each pack once."""

    def __init__(self, repo: Repository, size: int = 8) -> None:
        self.repo, self.size = repo, size
        self.cache: OrderedDict[str, bytes] = OrderedDict()

    def get(self, digest: str) -> bytes:
        if digest in self.cache:
            self.cache.move_to_end(digest)
            return self.cache[digest]
        try:
            data = decompress_bounded(self.repo.get_chunk(digest, MAX_CHUNK_BYTES), MAX_CHUNK_BYTES)
        except zstandard.ZstdError:
            raise ChecksumMismatch(
                f"chunk {digest[:16]}… on target '{self.repo.target.name}' is not a valid zstd frame",
                "the repository is damaged; restore from another backup or copy",
            ) from None
        self.cache[digest] = data
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return data


@dataclass
class SetView:
    """Entries with paths '/<volume key>/<path>' and a reader for a file entry's bytes."""

    ref: SetRef
    entries: list[dict]
    skipped: list[str] = field(default_factory=list)
    _readers: dict[str, Any] = field(default_factory=dict)

    def read(self, entry: dict) -> Iterator[bytes]:
        return self._readers[entry["_volume"]](entry)


def _file_set_view(repo: Repository, manifest: FileSetManifest, ref: SetRef) -> SetView:
    fsets, cache = FileSets(repo), ChunkCache(repo)

    def read(entry: dict) -> Iterator[bytes]:
        for digest, offset, length in entry["pieces"] or ():
            yield cache.get(digest)[offset : offset + length]

    view = SetView(ref, [], [f"{s.key}: {s.reason}" for s in manifest.skipped_volumes])
    for record in manifest.volumes:
        view._readers[record.key] = read
        for e in fsets.read_entries(manifest, record):
            link = f"/{record.key}{e['link']}" if e.get("link") else None
            view.entries.append(
                {**e, "path": f"/{record.key}{e['path']}", "link": link, "_volume": record.key}
            )
    return view


@contextmanager
def _image_view(repo: Repository, manifest: Manifest, ref: SetRef) -> Iterator[SetView]:
    from hotvm.files.blockdev import open_backup_disk
    from hotvm.files.fs import FilesystemUnreadable, open_filesystem
    from hotvm.files.volumes import find_volumes

    view = SetView(ref, [])
    with ExitStack() as stack:
        for record in manifest.disks:
            source = open_backup_disk(repo, record)
            if hasattr(source, "__enter__"):
                source = stack.enter_context(source)
            for volume in find_volumes(source, record.device):
                try:
                    fs = stack.enter_context(open_filesystem(source, volume))
                except FilesystemUnreadable as exc:
                    view.skipped.append(f"{volume.key}: {exc.message}")
                    continue
                items: dict[str, Any] = {}
                first_link: dict[int, str] = {}
                for item in fs.walk():
                    e = entry_dict(item)
                    if e["path"] == "/":
                        continue
                    e["path"] = f"/{volume.key}{e['path']}"
                    e["_volume"] = volume.key
                    if item.kind == "file" and item.nlink > 1:
                        e["link"] = first_link.setdefault(item.inode, e["path"])
                        e["link"] = None if e["link"] == e["path"] else e["link"]
                    items[e["path"]] = item
                    view.entries.append(e)

                def read(entry: dict, fs=fs, items=items) -> Iterator[bytes]:  # noqa: ANN001
                    return fs.read(items[entry["path"]], 4 << 20)

                view._readers[volume.key] = read
        yield view


@contextmanager
def open_view(repo: Repository, ref: SetRef) -> Iterator[SetView]:
    if ref.kind == "files":
        yield _file_set_view(repo, ref.manifest, ref)
    else:
        with _image_view(repo, ref.manifest, ref) as view:
            yield view


def select(entries: list[dict], paths: list[str]) -> list[dict]:
    """Entries at or under any of `paths` ('/' = all), parents first; unknown paths are an error. A path
    is matched as the shell passed it (a name's raw bytes) and as `files ls`/`find` print it (printable)."""
    wanted = ["/" + p.strip("/") if p.strip("/") else "/" for p in paths]
    chosen, missing = [], []
    for p in wanted:
        forms = {p, unprintable(p)}
        hits = [
            e for e in entries
            if p == "/" or any(e["path"] == f or e["path"].startswith(f + "/") for f in forms)
        ]  # fmt: skip
        if not hits:
            missing.append(p)
        chosen += hits
    if missing:
        raise HotvmError(
            f"not in this backup: {', '.join(printable(m) for m in missing)}",
            "paths are /<volume>/<path in it>; see 'hotvm files ls VM' for the volumes and names",
        )
    unique = {e["path"]: e for e in chosen}
    return sorted(unique.values(), key=lambda e: e["path"].count("/"))


# ---- catalog sync


def sync_catalog(catalog: Catalog, repo: Repository, vm: str | None = None) -> dict:
    """Index every complete file set the catalog lacks; drop sets gone from the target."""
    fsets = FileSets(repo)
    present = {(e.vm, e.backup_id): e for e in fsets.list_sets(vm) if e.manifest is not None}
    indexed, dropped = 0, 0
    for row in catalog.sets(vm):
        key = (row["vm"], row["backup_id"])
        gone = key not in present if row["kind"] == "files" else not _image_exists(repo, *key)
        if gone:
            with catalog.db:
                catalog.drop_set(*key)
            dropped += 1
    for (set_vm, backup_id), e in sorted(present.items()):
        if catalog.has_set(set_vm, backup_id):
            continue
        m = e.manifest
        catalog.index_set(
            set_vm, backup_id, "files", m.completed_at, ((r.key, fsets.read_entries(m, r)) for r in m.volumes)
        )
        indexed += 1
    return {"indexed": indexed, "dropped": dropped, "catalog": str(catalog.path)}


def synced_catalog(repo: Repository, vm: str | None = None) -> Catalog:
    """The local catalog of `repo`, first brought up to date with its file sets (of `vm`, or all)."""
    catalog = Catalog.for_repository(repo)
    sync_catalog(catalog, repo, vm)
    return catalog


def list_directory(
    catalog: Catalog, repo: Repository, ref: SetRef, path: str
) -> tuple[list[dict], list[str]]:
    """A directory of a backup set from the catalog; an image set is indexed (read through its chunks) on
    first look. Returns the rows and the volumes that could not be read."""
    problems = [] if catalog.has_set(ref.vm, ref.backup_id) else index_image_set(catalog, repo, ref)
    return catalog.ls(ref.vm, ref.backup_id, path), problems


def default_files_target(config: Config) -> str | None:
    """With one policy that names a files target, that target; else None (the default target)."""
    targets = {p.files.target for p in config.effective_policies() if p.files is not None and p.files.target}
    return targets.pop() if len(targets) == 1 else None


def _image_exists(repo: Repository, vm: str, backup_id: str) -> bool:
    try:
        repo.load_manifest(vm, backup_id)
    except BackupSetError:
        return False
    return True


def index_image_set(catalog: Catalog, repo: Repository, ref: SetRef) -> list[str]:
    """Index an image set (read through its chunks); returns the volumes that could not be read."""
    with open_view(repo, ref) as view:
        by_volume: dict[str, list[dict]] = {}
        for e in view.entries:
            key = e["_volume"]
            by_volume.setdefault(key, []).append({**e, "path": e["path"][len(key) + 1 :]})
        catalog.index_set(ref.vm, ref.backup_id, "image", ref.completed_at, by_volume.items())
        return view.skipped
