"""`hotvm sync-config`: each VM's latest backed-up config registered on its standby host."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import emit_or_exit, out


def sync_config_cmd(
    vm: Annotated[
        str | None, typer.Argument(help="only this VM (default: every VM with a standby_host)")
    ] = None,
    standby: Annotated[
        str | None, typer.Option("--standby", help="standby host (default: the VM's standby_host)")
    ] = None,
    with_disks: Annotated[
        bool, typer.Option("--with-disks", help="also restore the latest disks into the standby's vm_dir")
    ] = False,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Register each VM's latest backed-up config on its standby host, powered off (seed: VMX sync)."""
    prefect_env(verbose)
    from flows.sync_config import sync_config
    from hotvm.errors import RunFailed

    try:
        rows, failed = sync_config(vm=vm, standby=standby, with_disks=with_disks, target=target,
                                   config=config_str(config)), None  # fmt: skip
    except RunFailed as exc:
        rows, failed = exc.results, exc
    emit_or_exit(rows, failed, as_json, _render_sync)


def _render_sync(rows: list[dict]) -> None:
    colour = {"created": "green", "updated": "yellow", "unchanged": "dim", "failed": "red"}
    table = Table("vm", "standby", "action", "backup", "where")
    for r in rows:
        action = r.get("action", "failed")
        table.add_row(
            r["vm"], r.get("host") or "", f"[{colour.get(action, 'white')}]{action}[/]",
            r.get("backup_id") or "", r.get("location") or r.get("error") or "",
        )  # fmt: skip
    out.print(table)
