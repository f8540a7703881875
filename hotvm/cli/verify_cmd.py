"""`hotvm verify` and `hotvm recover`: restore tests and recovery by tier, with per-VM reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import out, run_reporting


def verify(
    vm: Annotated[str | None, typer.Argument(help="VM name (default: every VM on the target)")] = None,
    backup_id: Annotated[
        str | None, typer.Option("--backup", help="backup id (default: latest complete)")
    ] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    boot: Annotated[
        bool, typer.Option("--boot", help="also boot the restored copy isolated and time it to ready")
    ] = False,
    sample: Annotated[
        int | None, typer.Option("--sample", help="test only N VMs, least recently tested first")
    ] = None,
    keep: Annotated[bool, typer.Option("--keep", help="keep the scratch restore for inspection")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Restore-test backups in a scratch directory: every chunk checked (--boot: booted with no network),
    result recorded beside the set. Exits 1 if any test fails, naming the damaged chunk or file."""
    prefect_env(verbose)
    from flows.verify import verify as verify_flow

    def call(return_state: bool):  # noqa: ANN202
        return verify_flow(
            vm=vm, backup_id=backup_id, target=target, boot=boot, keep=keep, sample=sample,
            config=config_str(config), return_state=return_state,
        )

    run_reporting(call, as_json, _render_verify)


def _render_verify(results: list[dict]) -> None:
    table = Table("vm", "backup", "mode", "restore s", "boot s", "ready s", "result")
    for r in results:
        boot = (r.get("boot_check") or {}).get("seconds")
        state = "[green]verified[/]" if r["verified"] else "[red]" + "; ".join(r["problems"]) + "[/]"
        table.add_row(
            r["vm"], r["backup_id"], r.get("mode") or "", f"{r['restore_seconds']:.1f}",
            f"{boot:.1f}" if boot is not None else "", f"{r['seconds_to_ready']:.1f}", state,
        )
    out.print(table)


def recover(
    tier: Annotated[int, typer.Option("--tier", help="recover every VM of this tier (1 = first)")],
    to: Annotated[Path, typer.Option("--to", help="directory; each VM goes into DIR/<vm>/")],
    target: TargetOpt = None,
    config: ConfigOpt = None,
    boot_check: Annotated[
        bool, typer.Option("--boot-check", help="boot each restored VM isolated and time it")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw")] = "qcow2",
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Restore all VMs of a tier in recovery order, at most each host's max_concurrent_backups at once;
    reports measured time vs RTO per VM. Exits 1 if a VM fails or misses its RTO."""
    prefect_env(verbose)
    from flows.recover import recover as recover_flow

    def call(return_state: bool):  # noqa: ANN202
        return recover_flow(
            tier=tier, to=str(to), target=target, boot_check=boot_check, fmt=fmt, config=config_str(config),
            return_state=return_state,
        )

    run_reporting(call, as_json, _render_recover)


def _render_recover(rows: list[dict]) -> None:
    table = Table("#", "vm", "host", "seconds", "RTO s", "result")
    for r in rows:
        if not r.get("verified"):
            state = "[red]" + "; ".join(r.get("problems") or []) + "[/]"
        elif r["meets_rto"] is False:
            state = "[red]over RTO[/]"
        else:
            state = "[green]recovered[/]"
        rto = f"{r['rto_s']:.0f}" if r["rto_s"] is not None else ""
        table.add_row(str(r["order"]), r["vm"], r["host"], f"{r['seconds']:.1f}", rto, state)
    out.print(table)
