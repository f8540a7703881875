"""`hotvm prune`: retention (the target's keep: policy or --keep-* flags), then the chunk sweep."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import emit, err, out


def _keep(flag: str, help_text: str) -> Any:
    return Annotated[int | None, typer.Option(flag, min=0, help=help_text, show_default=False)]


KeepLast = _keep("--keep-last", "keep the N newest sets")
KeepDays = _keep("--keep-days", "keep every set younger than N days")
KeepDaily = _keep("--keep-daily", "keep the newest set of each of the N newest days")
KeepWeekly = _keep("--keep-weekly", "the newest of each of N ISO weeks")
KeepMonthly = _keep("--keep-monthly", "the newest of each of N months")
KeepYearly = _keep("--keep-yearly", "the newest of each of N years")


def prune(
    vm: Annotated[str | None, typer.Argument(help="only this VM's sets (chunks: repository-wide)")] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would go and why")] = False,
    keep_last: KeepLast = None,
    keep_days: KeepDays = None,
    keep_daily: KeepDaily = None,
    keep_weekly: KeepWeekly = None,
    keep_monthly: KeepMonthly = None,
    keep_yearly: KeepYearly = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Remove the backup sets the target's keep: policy does not keep (any --keep-* flag replaces the
    policy), then the chunks no remaining set references (prune flow). The newest complete backup of a VM
    and sets of backups that may still be running always stay."""
    prefect_env(verbose)
    from flows.prune import prune as prune_flow

    result = prune_flow(
        target=target, vm=vm, dry_run=dry_run, config=config_str(config), keep_last=keep_last,
        keep_days=keep_days, keep_daily=keep_daily, keep_weekly=keep_weekly, keep_monthly=keep_monthly,
        keep_yearly=keep_yearly,
    )
    emit(result, as_json, _render_prune)


def _render_prune(result: dict) -> None:
    from rich.table import Column

    dry = result["dry_run"]
    table = Table(
        "vm", Column("backup", no_wrap=True), "state", Column("time", no_wrap=True), "decision", "why"
    )
    for s in result["sets"]:
        if s["error"]:
            decision = f"[red]removal failed: {s['error']}[/]"
        elif s["keep"]:
            decision = "[green]keep[/]"
        else:
            decision = "[yellow]would remove[/]" if dry else "[yellow]removed[/]"
        when = s["time"][:16].replace("T", " ")
        table.add_row(s["vm"], s["backup_id"], s["state"], when, decision, "; ".join(s["reasons"]))
    out.print(table)
    sweep = result["sweep"]
    verb = "would remove" if dry else "removed"
    out.print(
        f"{'[dry run] ' if dry else ''}{result['kept']} set(s) kept, {result['removed']} {verb}; "
        f"chunks: {sweep['chunks_total']} in the store, {sweep['chunks_referenced']} referenced"
    )
    if sweep["swept"]:
        out.print(
            f"sweep: {sweep['chunks_removed']} unreferenced chunk(s) {verb}, "
            f"{sweep['chunks_too_young']} too young to remove, {len(sweep['tmp_removed'])} stray file(s); "
            f"{result['bytes_freed'] / 2**20:.1f} MiB {'to free' if dry else 'freed'}"
        )
    for reason in sweep["skipped_because"]:
        out.print(f"[yellow]chunk sweep skipped:[/] {reason}")
    for note in sweep["notes"]:
        out.print(f"note: {note}")
    for error in result["errors"]:
        err.print(f"[red]error:[/] {error}")
