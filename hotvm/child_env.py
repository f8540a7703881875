"""The environment of every process hotvm starts: its own, minus the secrets it holds.

hotvm reads passwords and keys from environment variables the config names (`password_env`,
`encryption_key_env`, `secret_key_env`, ...). A child inheriting them (qemu, qemu-img, a boot check,
Prefect's embedded server) exposes them in /proc/<pid>/environ and to whatever that child runs in turn.
Every spawn in hotvm/ and targets/ passes `env=child_env()`; a child that needs one of them says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pydantic import BaseModel

ALWAYS_SECRET = frozenset({"PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"})
"""Not named in hotvm.yaml, yet secrets no child of hotvm needs."""

_named_in_config: set[str] = set()


def secret_env_names(model: BaseModel) -> set[str]:
    """Every variable name a `*_env` key of `model` (or of a model inside it) gives."""
    names: set[str] = set()
    for field, value in model:
        if field.endswith("_env") and isinstance(value, str) and value:
            names.add(value)
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, BaseModel):
                names |= secret_env_names(item)
    return names


def register_config(model: BaseModel) -> None:
    """Called for every loaded config: its secrets are withheld from children from now on."""
    _named_in_config.update(secret_env_names(model))


def withheld() -> set[str]:
    return set(ALWAYS_SECRET | _named_in_config)


def child_env(keep: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment without hotvm's secrets (except those in `keep`), plus `extra`."""
    hidden = withheld() - set(keep)
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(extra)
    return env
