"""What every command shares: the consoles, the shared options, output, progress bars, the error exits.

The shared options (--config, --target, --json, --verbose) are declared once here. Each command takes the
ones it uses; `hotvm --config F --json backup VM` sets them for the subcommand too (`shared_defaults`),
and one given after the subcommand wins.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from hotvm import progress as progress_events
from hotvm.errors import HotvmError

out = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="hotvm.yaml (default: $HOTVM_CONFIG or ./hotvm.yaml)")
]
TargetOpt = Annotated[
    str | None, typer.Option("--target", "-t", help="target name (default: the only or default one)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect logs")]

SHARED = ("config", "target", "as_json", "verbose")  # the parameter names of the options above


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


def config_str(config: Path | None) -> str | None:
    """Flows take the config path as a string (their parameters must serialise)."""
    return str(config) if config else None


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """--json: the result as JSON on stdout; otherwise the command's rich rendering."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(result)


def emit_or_exit(
    result: Any, failure: HotvmError | None, as_json: bool, render: Callable[[Any], None]
) -> None:
    """Print a run's per-VM report either way; if the run failed, one error line after it and exit 1."""
    emit(result, as_json, render)
    if failure is not None:
        err.print(f"[bold red]error:[/] {failure.message}")
        raise typer.Exit(1)


def run_reporting(flow_call: Callable[..., Any], as_json: bool, render: Callable[[Any], None]) -> None:
    """Run a flow that raises RunFailed with its per-VM results: print them either way, exit 1 on failure."""
    from hotvm.errors import RunFailed

    state = flow_call(return_state=True)
    if state.is_completed():
        emit(state.result(), as_json, render)
        return
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, RunFailed):
        emit_or_exit(exc.results, exc, as_json, render)
    if isinstance(exc, BaseException):
        raise exc
    raise HotvmError(state.message or "the run failed", "rerun with --verbose")


@contextmanager
def progress_bars(enabled: bool):
    """Rich bars on stderr, fed by the export/restore progress events emitted inside the tasks."""
    if not enabled:
        yield
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bars:
        ids: dict[str, int] = {}

        def listener(activity: str, item: str, done: int, total: int) -> None:
            key = f"{activity} {item}"
            if key not in ids:
                ids[key] = bars.add_task(key, total=total or 1)
            bars.update(ids[key], completed=done, total=total or 1)

        progress_events.set_listener(listener)
        try:
            yield
        finally:
            progress_events.set_listener(None)


def fail_and_exit(exc: HotvmError) -> None:
    """One line saying what failed, one saying what to do; exit code 2."""
    err.print(f"[bold red]error:[/] {exc.message}")
    if exc.hint:
        err.print(f"  [yellow]fix:[/] {exc.hint}")
    sys.exit(2)
