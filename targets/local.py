"""file:// targets: a local directory or a mounted NFS/CIFS share (the seed's first choice of target)."""

from __future__ import annotations

import os
import shutil
from urllib.parse import unquote, urlparse

from fsspec.implementations.local import LocalFileSystem

from hotvm.models import TargetConfig
from targets.base import Target


class LocalTarget(Target):
    scheme = "file"

    def _put_durably(self, full_path: str, data: bytes) -> None:
        # fsync before the rename: a manifest must never point at chunks a power cut could lose.
        with open(full_path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def free_bytes(self) -> int | None:
        path = self.root
        while not os.path.exists(path):
            path = os.path.dirname(path) or "/"
        return shutil.disk_usage(path).free


def open_local(config: TargetConfig) -> LocalTarget:
    url = config.url
    root = unquote(urlparse(url).path) if url.startswith("file://") else url
    return LocalTarget(config.name, url if "://" in url else f"file://{url}", LocalFileSystem(), root)
