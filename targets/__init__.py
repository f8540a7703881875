"""Backup targets by URL scheme; each scheme is one module behind the same small Target class."""

from __future__ import annotations

from urllib.parse import urlparse

from hotvm.errors import ConfigError
from hotvm.models import TargetConfig
from targets.base import Target
from targets.local import open_local

_OPENERS = {"file": open_local, "": open_local}


def open_target(config: TargetConfig) -> Target:
    scheme = urlparse(config.url).scheme if "://" in config.url else ""
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise ConfigError(
            f"target '{config.name}': unsupported URL scheme '{scheme}://'",
            f"use one of: {', '.join(sorted(s + '://' for s in _OPENERS if s))}",
        )
    return opener(config)


__all__ = ["Target", "open_target"]
