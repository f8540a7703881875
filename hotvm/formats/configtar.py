"""The seed's 'VMX tar': the VM's defining files plus what the hypervisor told us, one zstd tar per backup."""

from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

ARCHIVE_NAME = "config.tar.zst"


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


@dataclass(frozen=True)
class ConfigContents:
    description: dict
    documents: dict[str, bytes]
    files: dict[str, bytes]
    """Regular files by their original absolute path."""


def read_config_archive(data: bytes) -> ConfigContents:
    """The inverse of build_config_archive, in memory (config archives are small)."""
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    description: dict = {}
    documents: dict[str, bytes] = {}
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            content = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "vm-description.json":
                description = json.loads(content)
            elif member.name.startswith("documents/"):
                documents[member.name.removeprefix("documents/")] = content
            elif member.name.startswith("files/"):
                files["/" + member.name.removeprefix("files/")] = content
    return ConfigContents(description, documents, files)
