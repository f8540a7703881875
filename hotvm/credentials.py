"""Secrets (passwords, keys) for targets and hypervisor hosts, resolved in one place.

A secret comes from an environment variable or a Prefect Secret block named in the config (`*_env`,
`*_secret`), never from hotvm.yaml itself. This module reads no config model: callers say who needs the
secret (`Owner`) and which variable or block names it, so targets, hosts and repositories share it.

The core runs without a Prefect server: Prefect is imported only when a block is named.
Secrets never appear in a message or a log: errors name the variable or the block, never the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from hotvm.errors import ConfigError, HotvmError, HypervisorError, TargetConfigError, TargetError


@dataclass(frozen=True)
class Credential:
    value: str | None
    source: str
    """Where the value came from, for messages: "environment variable X", "Prefect Secret block 'y'"."""

    def __repr__(self) -> str:  # a traceback or a debug log must not show the value
        return f"Credential(source={self.source!r})"


@dataclass(frozen=True)
class Owner:
    """Who needs a secret, for messages, and which errors a missing or unreadable secret raises."""

    label: str
    """"target 'nas'", "host 'esx1'"."""
    missing: type[HotvmError] = ConfigError
    """Not set, no such block: retrying cannot help."""
    unavailable: type[HotvmError] = HotvmError
    """The Prefect API is down: a retry may help."""


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def target(config: _Named) -> Owner:
    return Owner(f"target '{config.name}'", TargetConfigError, TargetError)


def host(config: _Named) -> Owner:
    return Owner(f"host '{config.name}'", ConfigError, HypervisorError)


_HANDED_IN: dict[str, str] = {}
"""Values a parent hotvm process handed to a helper process through a private pipe (the instant-restore NBD
plugin), by variable name: used instead of the environment, which must not carry them there."""


def hand_in(values: dict[str, str]) -> None:
    _HANDED_IN.update(values)


def from_env(owner: Owner, var: str, what: str = "password") -> Credential:
    value = _HANDED_IN.get(var) or os.environ.get(var)
    if value is None or value == "":
        raise owner.missing(
            f"{owner.label}: environment variable {var} (its {what}) is not set",
            f"export {var}=... in the environment that runs hotvm (or its Prefect worker)",
        )
    return Credential(value, f"environment variable {var}")


def from_prefect_secret(owner: Owner, block: str, what: str = "password") -> Credential:
    try:
        from prefect.blocks.system import Secret
    except ImportError:  # pragma: no cover - prefect is a dependency, but the core must not need it
        raise owner.missing(
            f"{owner.label}: Prefect Secret block '{block}' (its {what}) needs Prefect, "
            "which is not installed",
            "install prefect, or name an environment variable instead (*_env)",
        ) from None
    hint = (f"create it: python -c \"import getpass; from prefect.blocks.system import Secret; "
            f"Secret(value=getpass.getpass()).save('{block}')\" (or in the Prefect UI: Blocks > Secret)")
    try:
        secret = Secret.load(block, _sync=True)
    except ValueError:
        raise owner.missing(
            f"{owner.label}: Prefect Secret block '{block}' (its {what}) does not exist", hint,
        ) from None
    except Exception as exc:  # noqa: BLE001 - the Prefect API may be down: say so, without details that leak
        raise owner.unavailable(  # not a ConfigError: the API may be back for the retry
            f"{owner.label}: cannot read Prefect Secret block '{block}' (its {what}): {type(exc).__name__}",
            "check that the Prefect API (PREFECT_API_URL) is reachable, or use an environment variable "
            "(*_env)",
        ) from None
    raw = secret.value.get_secret_value()  # not Secret.get(): it would turn "123" into an int
    if isinstance(raw, dict):
        raw = raw.get("password", raw.get("value"))
    if not isinstance(raw, str) or raw == "":
        raise owner.missing(f"{owner.label}: Prefect Secret block '{block}' holds no usable {what}", hint)
    return Credential(raw, f"Prefect Secret block '{block}'")


def resolve(owner: Owner, env: str | None, block: str | None, what: str, key: str = "password") -> Credential:
    """The secret named by `<key>_env` or `<key>_secret`, never both; value None if neither is set."""
    if env and block:
        raise owner.missing(f"{owner.label} sets both {key}_env and {key}_secret", "keep one of them")
    if env:
        return from_env(owner, env, what)
    if block:
        return from_prefect_secret(owner, block, what)
    return Credential(None, f"no {what} configured ({key}_env / {key}_secret)")


class _HasPassword(_Named, Protocol):
    @property
    def password_env(self) -> str | None: ...
    @property
    def password_secret(self) -> str | None: ...


class _HasEncryptionKey(_Named, Protocol):
    @property
    def encryption_key_env(self) -> str | None: ...
    @property
    def encryption_key_secret(self) -> str | None: ...


def password(config: _HasPassword, what: str = "password", owner: Owner | None = None) -> Credential:
    """A target's (default) or a host's password from password_env or password_secret."""
    return resolve(owner or target(config), config.password_env, config.password_secret, what)


def encryption_key(config: _HasEncryptionKey | None) -> Credential:
    """A target's repository encryption secret; value None if the repository is not encrypted."""
    if config is None:
        return Credential(None, "no target configuration")
    return resolve(target(config), config.encryption_key_env, config.encryption_key_secret,
                   "encryption key", "encryption_key")
