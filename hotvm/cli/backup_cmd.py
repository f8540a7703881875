"""`hotvm backup VM` and `hotvm backup --all`: the weekly-image flow for one VM or a policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import emit, emit_or_exit, err, out, progress_bars
from hotvm.errors import HotvmError


def backup(
    vm: Annotated[str | None, typer.Argument(help="VM name from hotvm.yaml (omit with --all)")] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    new: Annotated[
        bool, typer.Option("--new", help="start a new set even if an unfinished one exists")
    ] = False,
    all_vms: Annotated[
        bool, typer.Option("--all", help="every VM of the policy (weekly-image run), a report per VM")
    ] = False,
    policy: Annotated[str, typer.Option("--policy", help="with --all: the policy in hotvm.yaml")] = "default",
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Back up a running VM hot (weekly-image flow for one VM); resumes an unfinished set of it.
    With --all: every VM of a policy, concurrently within each host's limit, reported per VM."""
    prefect_env(verbose)
    if all_vms or vm is None:
        if vm is not None or not all_vms:
            raise HotvmError("give either a VM name or --all", "hotvm backup VM, or hotvm backup --all")
        _backup_all(policy, target, config, as_json)
        return
    from hotvm.config_file import load_config
    from hotvm.formats.opener import open_repository
    from hotvm.hypervisors.resolve import find_vm
    from hotvm.resume import image_resume_id

    cfg = load_config(config)
    find_vm(cfg, vm)
    resume_id = None
    if not new:
        with open_repository(cfg, target) as repo:
            resume_id = image_resume_id(repo, vm)
    if resume_id:
        err.print(f"resuming unfinished backup set {resume_id} (use --new for a fresh one)")
    from flows.backup_vm import backup_vm

    with progress_bars(not as_json):
        result = backup_vm(vm=vm, target=target, config=config_str(config), backup_id=resume_id)
    emit(result, as_json, _render_backup)


def _backup_all(policy: str, target: str | None, config: Path | None, as_json: bool) -> None:
    from flows._fleet import BackupsFailed, report_rows
    from flows.backup_policy import backup_policy
    from hotvm.config_file import load_config

    load_config(config).find_policy(policy)  # a clear error before any flow starts
    try:
        results, failed = backup_policy(policy=policy, config=config_str(config), target=target), None
    except BackupsFailed as exc:
        results, failed = exc.results, exc
    emit_or_exit(report_rows(results), failed, as_json, _render_backup_all)


def _render_backup_all(rows: list[dict]) -> None:
    colour = {"success": "green", "skipped": "yellow", "failed": "red"}
    table = Table("host", "vm", "status", "backup / step", "detail", "seconds")
    for r in rows:
        table.add_row(
            r["host"], r["vm"], f"[{colour[r['status']]}]{r['status']}[/]",
            r["backup_id"] or r["step"] or "", r["detail"], f"{r['seconds']:.1f}",
        )  # fmt: skip
    out.print(table)
    counts = {k: sum(r["status"] == k for r in rows) for k in colour}
    out.print(", ".join(f"{n} {k}" for k, n in counts.items()))


def _render_backup(result: dict) -> None:
    if result.get("skipped"):
        out.print(f"[yellow]backup of {result['vm']} skipped:[/] {result['skipped']}")
        return
    out.print(f"[bold green]backup {result['backup_id']} of {result['vm']} complete[/]")
    out.print(f"set: {result['url']}")
    out.print(f"consistency: {result.get('consistency', 'crash')}")
    table = Table("step", "disk", "seconds", "note")
    for step in result["steps"]:
        table.add_row(step["name"], step["device"] or "", f"{step['seconds']:.3f}", step.get("note", ""))
    out.print(table)
    for disk in result["disks"]:
        out.print(
            f"disk {disk['device']} ({disk.get('mode', 'full')}): {disk['bytes'] >> 20} MiB, "
            f"read {disk['bytes_read'] >> 20} MiB, "
            f"new {disk['bytes_new'] >> 20} MiB, pivot stall {disk['pivot_stall_ms'] or 0:.1f} ms"
        )
    for warning in result["warnings"]:
        out.print(f"[yellow]warning:[/] {warning}")
