"""The seed's 'VMX tar': the VM's defining files plus what the hypervisor told us, one zstd tar per backup."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import zstandard

ARCHIVE_NAME = "config.tar.zst"


def build_config_archive(files: list[Path], vm_description: dict) -> tuple[bytes, list[str]]:
    """Return (archive bytes, member names). Files keep their absolute path below 'files/'."""
    raw = io.BytesIO()
    names: list[str] = []
    with tarfile.open(fileobj=raw, mode="w:") as tar:
        desc = json.dumps(vm_description, indent=2, default=str).encode()
        info = tarfile.TarInfo("vm-description.json")
        info.size, info.mtime, info.mode = len(desc), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(desc))
        names.append(info.name)
        for path in files:
            arcname = "files/" + str(path.resolve()).lstrip("/")
            tar.add(path, arcname=arcname, recursive=True)
            names.append(arcname)
    return zstandard.ZstdCompressor(level=10).compress(raw.getvalue()), names
