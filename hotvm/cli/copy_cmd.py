"""`hotvm copy --to TARGET`: copy complete sets to another target (docs/copies.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, config_str
from hotvm.cli._output import emit, out


def copy_cmd(
    to: Annotated[str, typer.Option("--to", help="destination target (the offsite copy)")],
    vms: Annotated[list[str] | None, typer.Argument(help="only these VMs (default: every VM)")] = None,
    source: Annotated[
        str | None, typer.Option("--from", help="source target (default: the only or default one)")
    ] = None,
    config: ConfigOpt = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="parallel transfers")] = 8,
    as_json: JsonOpt = False,
) -> None:
    """Copy every complete set the destination lacks (image and file sets, inventories, plans), sending
    only missing chunks, verified, manifest last; rerun to resume (docs/copies.md)."""
    from hotvm.copy import copy_between

    result = copy_between(config_str(config), source, to, vms or None, workers=workers).summary()

    def render(result: dict) -> None:
        table = Table("kind", "vm", "backup", "action", "files", "MiB")
        colour = {"copied": "green", "present": "white", "skipped": "yellow"}
        for r in result["sets"]:
            action = f"[{colour[r['action']]}]{r['action']}[/]" + (f" ({r['reason']})" if r["reason"] else "")
            table.add_row(r["kind"], r["vm"], r["backup_id"], action, str(r["files_sent"]),
                          f"{r['bytes_sent'] / 2**20:.1f}")
        out.print(table)
        lock = f", immutable until {result['immutable_until'][:19]}" if result["immutable_until"] else ""
        out.print(
            f"[bold green]copied {result['copied']} set(s)[/] from '{result['source']}' to "
            f"'{result['destination']}': {result['chunks_sent']} chunk(s) sent, {result['chunks_present']} "
            f"already there; {result['bytes_sent'] / 2**20:.1f} MiB in {result['seconds']:.1f} s{lock}"
        )

    emit(result, as_json, render)
