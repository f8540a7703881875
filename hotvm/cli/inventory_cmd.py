"""`hotvm inventory`: every VM of every host, optionally versioned on a target."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt
from hotvm.cli._output import err, out
from hotvm.errors import HotvmError


def inventory_cmd(
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv, xlsx, md or json (default: a table)")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to this file")] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="also version it there (inventory/) and report the changes"),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every VM of every host: CPUs, RAM, disks (bus, path, format, size, allocated, mode), NICs with
    MACs, CD-ROMs, startup order, limits, status. Unreachable VMs are listed with the reason."""
    from hotvm import inventory
    from hotvm.config_file import load_config

    fmt = "json" if as_json and fmt is None else fmt
    if fmt is not None and fmt not in inventory.FORMATS:
        raise HotvmError(f"unknown format '{fmt}'", f"use one of: {', '.join(inventory.FORMATS)}")
    if fmt == "xlsx" and output is None:
        raise HotvmError("xlsx is a binary file", "add --output FILE.xlsx")
    cfg = load_config(config)
    inv = inventory.collect(cfg)
    if target is not None:
        from hotvm.formats.opener import open_repository

        with open_repository(cfg, target) as repo:
            stored, prev_name, prev = inventory.store(repo, inv)
        change = inventory.diff(prev, inv)
        err.print(f"inventory stored as {stored} on target '{cfg.find_target(target).name}'")
        err.print(inventory.diff_markdown(change, prev_name), markup=False, highlight=False)
    if fmt is None:
        _render_inventory(inventory.vm_rows(inv), output)
        return
    data = inventory.render(inv, fmt)  # type: ignore[arg-type]
    if output is None:
        sys.stdout.write(data.decode())
    else:
        output.write_bytes(data)
        err.print(f"inventory of {len(inv.vms)} VM(s) written to {output}")


def _render_inventory(rows: list[dict], output: Path | None) -> None:
    table = Table("host", "vm", "status", "cpus", "MiB", "disks", "nics", "order", "policy")
    for r in rows:
        state = f"[red]{r['error']}[/]" if r["error"] else r["status"]
        table.add_row(
            r["host"], r["vm"], state, r["cpus"], r["memory_mb"], r["disks"].replace("; ", "\n"),
            r["nics"].replace("; ", "\n"), r["startup_order"], r["policy"] or "[yellow]none[/]",
        )  # fmt: skip
    if output is None:
        out.print(table)
    else:
        with output.open("w") as fh:
            Console(file=fh, width=200).print(table)
