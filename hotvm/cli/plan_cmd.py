"""`hotvm plan check|export`: RPO, RTO and tiers per VM; the DR plan document."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt
from hotvm.cli._output import emit, err, out
from hotvm.errors import HotvmError

plan_app = typer.Typer(help="RPO, RTO and tiers per VM; the DR plan document.", no_args_is_help=True)


@plan_app.command("check")
def plan_check_cmd(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Check every VM: schedules meet its RPO, file-level backup if it asks for file restores, last
    measured restore within its RTO. Prints the violations; exits 1 if there are any."""
    from hotvm.config_file import load_config
    from hotvm.plan import check_plan

    violations = [v.as_dict() for v in check_plan(load_config(config))]

    def render(rows: list[dict]) -> None:
        if not rows:
            out.print("[bold green]every VM meets its RPO and RTO[/]")
            return
        table = Table("vm", "host", "check", "problem")
        for r in rows:
            table.add_row(r["vm"], r["host"], r["check"], f"[red]{r['detail']}[/]")
        out.print(table)
        out.print(f"[bold red]{len(rows)} violation(s)[/]")

    emit(violations, as_json, render)
    if violations:
        raise typer.Exit(1)


@plan_app.command("export")
def plan_export_cmd(
    fmt: Annotated[str, typer.Option("--format", "-f", help="md, html or xlsx")] = "md",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write (default: stdout; xlsx needs a file)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Write the DR plan: per tier, the VMs in recovery order, their latest backups (image, tape with
    media labels), the exact restore commands, measured restore times, contacts and notes."""
    from hotvm.config_file import load_config
    from hotvm.plan import FORMATS, plan_document, render

    if fmt not in FORMATS:
        raise HotvmError(f"unknown plan format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if fmt == "xlsx" and output is None:
        raise HotvmError("xlsx cannot be written to a terminal", "pass --output FILE.xlsx")
    data = render(plan_document(load_config(config)), fmt)
    if output is None:
        sys.stdout.write(data.decode())
        return
    output.write_bytes(data)
    err.print(f"DR plan written to {output}")
