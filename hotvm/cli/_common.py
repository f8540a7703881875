"""What every command shares: the shared options, the Prefect environment, the config argument for flows.

The shared options (--config, --target, --json, --verbose) are declared once here. Each command takes the
ones it uses; `hotvm --config F --json backup VM` sets them for the subcommand too (`shared_defaults`),
and one given after the subcommand wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="hotvm.yaml (default: $HOTVM_CONFIG or ./hotvm.yaml)")
]
TargetOpt = Annotated[
    str | None, typer.Option("--target", "-t", help="target name (default: the only or default one)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect logs")]

def shared_defaults(group: Any, given: dict[str, Any]) -> dict[str, Any]:
    """A default_map giving each (sub)command the shared options it takes: an option set before the
    subcommand becomes that command's default, so the same option after the subcommand still wins.
    `group` is typer's (vendored click) command group; a group is whatever has subcommands."""
    tree: dict[str, Any] = {}
    for name, command in group.commands.items():
        if getattr(command, "commands", None) is not None:
            tree[name] = shared_defaults(command, given)
        else:
            takes = {p.name for p in command.params}
            tree[name] = {k: v for k, v in given.items() if k in takes}
    return tree


def prefect_env(verbose: bool = False) -> None:
    """Quiet, robust defaults for Prefect's embedded server; the user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Failures reach the user as one line from hotvm; Prefect's tracebacks only with --verbose.
    os.environ["PREFECT_LOGGING_LEVEL"] = "INFO" if verbose else "CRITICAL"
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # the embedded server: it must die with this process, even SIGKILLed
        from flows._embedded_server import install

        install()
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
        no_heartbeats()


def no_heartbeats() -> None:
    """This process's flow runs send no heartbeats. Why: each run's teardown waits for the heartbeat
    thread's 1 s sleep (measured 1.0 s -> 0.2 s per flow run), and nothing watches a CLI run's heartbeats
    (it runs in the foreground; its watchdog and reconcile cover a killed one). Entered for the life of
    the process; threads of Prefect's task runners copy it. Set PREFECT_FLOWS_HEARTBEAT_FREQUENCY to keep
    them."""
    from prefect.settings import temporary_settings

    global _SETTINGS  # kept: a collected context manager would close its generator and undo the settings
    _SETTINGS = temporary_settings(updates={"flows.heartbeat_frequency": None})
    _SETTINGS.__enter__()


_SETTINGS = None


def config_str(config: Path | None) -> str | None:
    """Flows take the config path as a string (their parameters must serialise)."""
    return str(config) if config else None
