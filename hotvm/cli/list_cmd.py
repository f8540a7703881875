"""`hotvm list`: the backup sets on a target."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt
from hotvm.cli._output import emit, out


def list_backups(
    vm: Annotated[str | None, typer.Argument(help="only this VM")] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the backup sets on a target (incomplete ones are marked and never restored)."""
    from hotvm.formats.opener import open_repository
    from hotvm.status import set_rows

    with open_repository(config, target) as repo:
        rows = set_rows(repo.list_sets(vm))

    def render(rows: list[dict]) -> None:
        table = Table("vm", "backup", "state", "completed", "disks", "size", "consistency")
        for r in rows:
            table.add_row(
                r["vm"],
                r["backup_id"],
                "complete" if r["complete"] else "[yellow]incomplete[/]",
                r["completed_at"] or "",
                ", ".join(r["disks"]),
                f"{r['bytes'] >> 20} MiB",
                r["consistency"] or "",
            )
        out.print(table)

    emit(rows, as_json, render)
