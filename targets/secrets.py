"""Credentials for targets: from environment variables named in the config, or a Prefect Secret block.

The core runs without a Prefect server: Prefect is imported only when a target names a `password_secret`.
Secrets never appear in a message: errors name the variable or the block, never the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hotvm.config import TargetConfig
from hotvm.errors import TargetConfigError, TargetError


@dataclass(frozen=True)
class Credential:
    value: str | None
    source: str
    """Where the value came from, for messages: "environment variable X", "Prefect Secret block 'y'"."""


_HANDED_IN: dict[str, str] = {}
"""Values a parent hotvm process handed to a helper process through a private pipe (the instant-restore NBD
plugin), by variable name: used instead of the environment, which must not carry them there."""


def hand_in(values: dict[str, str]) -> None:
    _HANDED_IN.update(values)


def from_env(config: TargetConfig, var: str, what: str = "password") -> Credential:
    value = _HANDED_IN.get(var) or os.environ.get(var)
    if value is None or value == "":
        raise TargetConfigError(
            f"target '{config.name}': environment variable {var} (its {what}) is not set",
            f"export {var}=... in the environment that runs hotvm (or its Prefect worker)",
        )
    return Credential(value, f"environment variable {var}")


def from_prefect_secret(
    config: TargetConfig, block: str, what: str = "password", owner: str | None = None
) -> Credential:
    """`owner` names who needs the secret in messages (default: the target; a vSphere host passes its own)."""
    owner = owner or f"target '{config.name}'"
    try:
        from prefect.blocks.system import Secret
    except ImportError:  # pragma: no cover - prefect is a dependency, but the core must not need it
        raise TargetConfigError(
            f"{owner}: Prefect Secret block '{block}' (its {what}) needs Prefect, "
            "which is not installed",
            "install prefect, or name an environment variable instead (*_env)",
        ) from None
    hint = (f"create it: python -c \"import getpass; from prefect.blocks.system import Secret; "
            f"Secret(value=getpass.getpass()).save('{block}')\" (or in the Prefect UI: Blocks > Secret)")
    try:
        secret = Secret.load(block, _sync=True)
    except ValueError:
        raise TargetConfigError(
            f"{owner}: Prefect Secret block '{block}' (its {what}) does not exist", hint,
        ) from None
    except Exception as exc:  # noqa: BLE001 - the Prefect API may be down: say so, without details that leak
        raise TargetError(  # not a ConfigError: the API may be back for the retry
            f"{owner}: cannot read Prefect Secret block '{block}' (its {what}): "
            f"{type(exc).__name__}",
            "check that the Prefect API (PREFECT_API_URL) is reachable, or use an environment variable "
            "(*_env)",
        ) from None
    raw = secret.value.get_secret_value()  # not Secret.get(): it would turn "123" into an int
    if isinstance(raw, dict):
        raw = raw.get("password", raw.get("value"))
    if not isinstance(raw, str) or raw == "":
        raise TargetConfigError(
            f"{owner}: Prefect Secret block '{block}' holds no usable {what}", hint,
        )
    return Credential(raw, f"Prefect Secret block '{block}'")


def _credential(config: TargetConfig, key: str, what: str) -> Credential:
    """`<key>_env` or `<key>_secret` of the target, never both; value None if neither is set."""
    env, block = getattr(config, f"{key}_env"), getattr(config, f"{key}_secret")
    if env and block:
        raise TargetConfigError(
            f"target '{config.name}' sets both {key}_env and {key}_secret", "keep one of them"
        )
    if env:
        return from_env(config, env, what)
    if block:
        return from_prefect_secret(config, block, what)
    return Credential(None, f"no {what} configured ({key}_env / {key}_secret)")


def password(config: TargetConfig, what: str = "password") -> Credential:
    """The target's password (or secret key) from password_env or password_secret."""
    return _credential(config, "password", what)


def encryption_key(config: TargetConfig) -> Credential:
    """The repository's encryption secret; value None if the repository is not encrypted."""
    return _credential(config, "encryption_key", "encryption key")
