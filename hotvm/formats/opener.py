"""The one way to open a repository (borg's `with_repository`, restic's `openWithExclusiveLock`).

    with open_repository(config, "nas") as repo:
        repo.list_sets("web01")

It owns the target connection: it resolves the encryption key once (hotvm.credentials), opens the target,
hands both to the Repository and closes the target (its pooled SFTP/FTP/SMB connections) on the way out,
also when the body raises. A Repository never looks up its own key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from hotvm import credentials
from hotvm.config import Config, TargetConfig
from hotvm.formats.repository import Repository

if TYPE_CHECKING:
    from hotvm.credentials import Credential


def target_config(
    config: Config | TargetConfig | str | Path | None, target: str | None = None
) -> TargetConfig:
    """The target's configuration: `config` itself, or the target named `target` (default: the first)."""
    if isinstance(config, TargetConfig):
        return config
    from hotvm.config_file import load_config

    return load_config(config).find_target(target)


@contextmanager
def open_repository(
    config: Config | TargetConfig | str | Path | None,
    target: str | None = None,
    key: Credential | str | None = None,
    remember: bool = True,
) -> Iterator[Repository]:
    """The repository on `target` of `config` (or on the target `config` is); `key` overrides the key the
    target's configuration names (a copy opens its destination with the source's key). `remember=False`
    keeps no identity for the location (a scratch directory)."""
    from targets import open_target

    cfg = target_config(config, target)
    if key is None:
        key = credentials.encryption_key(cfg)  # before connecting: a missing key fails without a login
    tgt = open_target(cfg)
    try:
        yield Repository(tgt, key, remember=remember)
    finally:
        tgt.close()
