"""`hotvm check`: verify a target's repository."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt
from hotvm.cli._output import emit, out


def check(
    target: TargetOpt = None,
    config: ConfigOpt = None,
    read_data: Annotated[
        bool, typer.Option("--read-data", help="also read every chunk and verify its sha256 (slow)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify a target's repository: manifests parse, referenced chunks exist (--read-data: and are
    intact). Exits 1 if any problem is found; every set is checked, whatever fails."""
    from hotvm.check import check_repository
    from hotvm.formats.opener import open_repository

    with open_repository(config, target) as repo:
        report = check_repository(repo, read_data=read_data)
    result = report.summary()
    emit(result, as_json, _render_check)
    if not report.ok:
        raise typer.Exit(1)


def _render_check(result: dict) -> None:
    from rich.table import Column

    locked = any(s.get("retained_until") for s in result["sets"])
    table = Table("vm", Column("backup", no_wrap=True), "state", "disks", "chunks", "problems",
                  *(["immutable until"] if locked else []))
    for s in result["sets"]:
        problems = "\n".join(f"{p['kind']}: {p['detail']}" for p in s["problems"])
        state = f"[red]{problems}[/]" if problems else "[green]ok[/]" if s["state"] == "complete" else ""
        state += "".join(f"\n[yellow]{w}[/]" for w in s.get("warnings", []))
        table.add_row(
            s["vm"], s["backup_id"], s["state"], str(s["disks"]), str(s["chunks"]), state,
            *([(s.get("retained_until") or "")[:19]] if locked else []),
        )
    if result["sets"]:
        out.print(table)
    for p in result["problems"]:
        out.print(f"[red]{p['kind']}:[/] {p['detail']}")
    read = f", {result['chunks_read']} read and verified ({result['bytes_read'] / 2**20:.1f} MiB)"
    unref = result["chunks_unreferenced"]
    out.print(
        f"{result['chunks_present']} chunk(s) in the store, {result['chunks_referenced']} referenced"
        f"{read if result['read_data'] else ''}"
        f"{f', {unref} unreferenced (hotvm prune removes them)' if unref else ''}; {result['seconds']:.1f} s"
    )
    if result["ok"]:
        out.print("[bold green]no problems found[/]")
    else:
        out.print(f"[bold red]{result['problem_count']} problem(s) found[/]")
