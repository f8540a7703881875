"""`hotvm status`: every configured VM, its disks, leftover overlays and block jobs."""

from __future__ import annotations

from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt
from hotvm.cli._output import emit, out


def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every configured VM: reachable?, disks and their modes, hotvm overlays still on them, block jobs."""
    from hotvm.config_file import load_config
    from hotvm.status import fleet_status

    rows = fleet_status(load_config(config))

    def render(rows: list[dict]) -> None:
        table = Table("host", "vm", "state", "disks", "overlays", "jobs")
        for r in rows:
            overlays = "; ".join(
                f"{d['device']}: {', '.join(d['hotvm_overlays'])}" for d in r["disks"] if d["hotvm_overlays"]
            )
            table.add_row(
                r["host"],
                r["vm"],
                r["state"],
                ", ".join(f"{d['device']} ({d['mode']})" for d in r["disks"]),
                f"[red]{overlays}[/]" if overlays else "none",
                ", ".join(r["jobs"]) or "none",
            )
        out.print(table)

    emit(rows, as_json, render)
