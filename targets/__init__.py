"""Backup targets by URL scheme; each scheme is one module behind the same small Target class.

A scheme's module is imported only when a target uses it, so a host that backs up to local disk does not need
smbprotocol, paramiko or s3fs to import cleanly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from urllib.parse import urlsplit

from hotvm.allocator import tune_for_large_buffers
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError
from targets.base import Target
from targets.local import open_local


def _lazy(module: str, func: str) -> Callable[[TargetConfig], Target]:
    def opener(config: TargetConfig) -> Target:
        return getattr(importlib.import_module(module), func)(config)

    opener.__name__ = func
    return opener


_OPENERS: dict[str, Callable[[TargetConfig], Target]] = {
    "file": open_local,
    "": open_local,
    "smb": _lazy("targets.smb", "open_smb"),
    "sftp": _lazy("targets.sftp", "open_sftp"),
    "ftp": _lazy("targets.ftp", "open_ftp"),
    "ftps": _lazy("targets.ftp", "open_ftp"),
    "s3": _lazy("targets.s3", "open_s3"),
}


def open_target(config: TargetConfig) -> Target:
    scheme = urlsplit(config.url).scheme if "://" in config.url else ""
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise ConfigError(
            f"target '{config.name}': unsupported URL scheme '{scheme}://'",
            f"use one of: {', '.join(sorted(s + '://' for s in _OPENERS if s))}",
        )
    if "://" in config.url:
        try:
            has_password = urlsplit(config.url).password is not None
        except ValueError:
            raise ConfigError(f"target '{config.name}': the URL cannot be parsed (bad port?)",
                              "write it as scheme://user@host[:port]/path") from None
        if has_password:
            raise TargetConfigError(
                f"target '{config.name}': the URL holds a password, which must not be written in hotvm.yaml",
                "remove it from the URL and name an environment variable (password_env:) or a Prefect Secret "
                "block (password_secret:) instead",
            )
    tune_for_large_buffers()  # chunk-sized buffers: see hotvm/allocator.py
    target = opener(config)
    target.config = config
    return target


__all__ = ["Target", "TargetConfigError", "open_target"]
