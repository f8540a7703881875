"""The seed's 'VMX tar': the VM's defining files plus what the hypervisor told us, one zstd tar per backup."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from hotvm.errors import BackupSetError
from hotvm.safepath import SafeRoot, UnsafePath, parts, printable

ARCHIVE_NAME = "config.tar.zst"
log = logging.getLogger("hotvm.restore")


def build_config_archive(
    files: list[Path], vm_description: dict, documents: dict[str, bytes] | None = None
) -> tuple[bytes, list[str]]:
    """Return (archive bytes, member names). Files keep their absolute path below 'files/'; documents
    (config the hypervisor generates: domain XML, a VMX fetched from a datastore) go below 'documents/'."""
    raw = io.BytesIO()
    names: list[str] = []
    with tarfile.open(fileobj=raw, mode="w:") as tar:
        desc = json.dumps(vm_description, indent=2, default=str).encode()
        info = tarfile.TarInfo("vm-description.json")
        info.size, info.mtime, info.mode = len(desc), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(desc))
        names.append(info.name)
        for doc_name, content in sorted((documents or {}).items()):
            info = tarfile.TarInfo("documents/" + doc_name)
            info.size, info.mtime, info.mode = len(content), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(content))
            names.append(info.name)
        for path in files:
            arcname = "files/" + str(path.resolve()).lstrip("/")
            tar.add(path, arcname=arcname, recursive=True)
            names.append(arcname)
    return zstandard.ZstdCompressor(level=10).compress(raw.getvalue()), names


MAX_PLAIN_BYTES = 256 << 20
"""A config archive holds launch scripts, domain XML, VMX files: far below this once decompressed."""
MAX_MEMBERS = 10_000


@dataclass(frozen=True)
class ConfigContents:
    description: dict
    documents: dict[str, bytes]
    files: dict[str, bytes]
    """Regular files by their original absolute path."""
    skipped: list[str] = field(default_factory=list)
    """Members that are neither regular files nor directories (symlinks, devices): never recreated."""


@dataclass(frozen=True)
class Member:
    name: str
    """Checked: a relative path of safe components."""
    is_dir: bool
    mode: int
    mtime: int
    data: bytes


def _unsafe(what: str) -> BackupSetError:
    return BackupSetError(
        f"config archive refused: {what}",
        "the archive was tampered with or damaged; restore the config from another backup (--backup ID)",
    )


def _plain(data: bytes) -> bytes:
    """The tar inside the zstd frame, at most MAX_PLAIN_BYTES (a decompression bomb stops there)."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            while block := reader.read(1 << 20):
                out += block
                if len(out) > MAX_PLAIN_BYTES:
                    raise _unsafe(f"it holds more than {MAX_PLAIN_BYTES >> 20} MiB")
    except zstandard.ZstdError as exc:
        raise _unsafe(f"not a zstd frame ({exc})") from None
    return bytes(out)


def config_members(data: bytes) -> tuple[list[Member], list[str]]:
    """Every member of a config archive, checked: (regular files and directories, names of the other
    members). Names must be relative paths of safe components (no '..', no absolute paths, no NUL); the
    member count and total size are bounded. The one reader of config archives (restore, standby, tape)."""
    members: list[Member] = []
    skipped: list[str] = []
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(_plain(data)), mode="r:") as tar:
            for count, info in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise _unsafe(f"more than {MAX_MEMBERS} members")
                try:
                    names = parts(info.name, "member")
                except UnsafePath:
                    raise _unsafe(
                        f"member '{printable(info.name)[:200]}' leaves the archive's directory"
                    ) from None
                if not names:
                    raise _unsafe(f"member '{printable(info.name)[:200]}' has no name")
                name = "/".join(names)
                if info.issparse() or not (info.isfile() or info.isdir()):
                    skipped.append(name)
                    continue
                total += info.size
                if info.size < 0 or total > MAX_PLAIN_BYTES:
                    raise _unsafe(f"member '{printable(name)[:200]}' is larger than the archive")
                content = b""
                if info.isfile():
                    content = tar.extractfile(info).read()  # type: ignore[union-attr]
                members.append(Member(name, info.isdir(), info.mode & 0o7777, int(info.mtime), content))
    except tarfile.TarError as exc:
        raise _unsafe(f"not a readable tar ({exc})") from None
    return members, skipped


def read_config_archive(data: bytes) -> ConfigContents:
    """The inverse of build_config_archive, in memory (config archives are small), every member checked."""
    members, skipped = config_members(data)
    description: dict = {}
    documents: dict[str, bytes] = {}
    files: dict[str, bytes] = {}
    for member in members:
        if member.is_dir:
            continue
        if member.name == "vm-description.json":
            try:
                description = json.loads(member.data)
            except ValueError:
                raise _unsafe("vm-description.json is not JSON") from None
            if not isinstance(description, dict):
                raise _unsafe("vm-description.json is not an object")
        elif member.name.startswith("documents/"):
            documents[member.name.removeprefix("documents/")] = member.data
        elif member.name.startswith("files/"):
            files["/" + member.name.removeprefix("files/")] = member.data
    return ConfigContents(description, documents, files, skipped)


def unpack_config_archive(data: bytes, dest: Path) -> list[str]:
    """Write the archive's files and directories below `dest` (a restore's config/ directory) through a
    SafeRoot: nothing leaves `dest`, no symlink is followed or created. Returns the member names."""
    members, skipped = config_members(data)
    written: list[str] = []
    dirs: list[Member] = []
    try:
        with SafeRoot(dest) as root:
            for m in members:
                if m.is_dir:
                    root.mkdir(m.name, 0o700)
                    dirs.append(m)
                else:
                    root.write_bytes(m.name, m.data, m.mode & 0o755)  # the tar 'data' filter's modes
                    root.set_metadata(m.name, None, None, (m.mtime * 10**9, m.mtime * 10**9))
                written.append(m.name)
            for m in reversed(dirs):
                root.set_metadata(m.name, (m.mode & 0o755) | 0o700, None, (m.mtime * 10**9, m.mtime * 10**9))
    except UnsafePath as exc:
        raise _unsafe(exc.message) from None
    except OSError as exc:
        raise _unsafe(f"cannot write it below {dest}: {exc}") from None
    if skipped:
        log.warning("config archive: %d member(s) neither file nor directory, not unpacked: %s",
                    len(skipped), ", ".join(printable(n) for n in skipped[:10]))  # fmt: skip
    return written
