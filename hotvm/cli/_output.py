"""What every command prints and how it ends: the consoles, --json or a rich rendering, progress bars, the
per-VM report that ends in exit 1, and the one-line error that ends in exit 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

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
