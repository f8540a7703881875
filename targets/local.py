"""file:// targets: a local directory or a mounted NFS/CIFS share (the seed's first choice of target).

Files are written 0600 and directories 0700 (whatever the umask): a repository holds whole disks. The root
is created only on first use; once a repository is known there, a missing root (a share unmounted under
it) fails the write instead of filling the local disk below the mount point.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import unquote, urlparse

from fsspec.implementations.local import LocalFileSystem

from hotvm.config import TargetConfig
from hotvm.errors import TargetError
from targets.base import Target

FILE_MODE = 0o600
DIR_MODE = 0o700


class LocalTarget(Target):
    scheme = "file"

    def _put_durably(self, full_path: str, data: bytes) -> None:
        # fsync before the rename: a manifest must never point at chunks a power cut could lose.
        fd = os.open(full_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, FILE_MODE)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def _makedirs(self, full_path: str) -> None:
        if self.root_known and not os.path.isdir(self.root):
            raise TargetError(
                f"target '{self.name}': its directory {self.root} is gone (share unmounted, or removed)",
                "mount it again (hotvm never re-creates a known target's directory) and rerun",
            )
        missing = []
        path = full_path
        while path and not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for new in reversed(missing):
            try:
                os.mkdir(new, DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(new, DIR_MODE)

    def free_bytes(self) -> int | None:
        path = self.root
        while not os.path.exists(path):
            path = os.path.dirname(path) or "/"
        return shutil.disk_usage(path).free


def open_local(config: TargetConfig) -> LocalTarget:
    url = config.url
    root = unquote(urlparse(url).path) if url.startswith("file://") else url
    return LocalTarget(config.name, url if "://" in url else f"file://{url}", LocalFileSystem(), root)
