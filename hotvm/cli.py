"""hotvm command line: parse, call a flow or the core, print a rich table or --json. Nothing else."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hotvm import progress as progress_events
from hotvm.errors import HotvmError

app = typer.Typer(
    help="Hot backups of running VMs (layered REDO overlays), run as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
vm_app = typer.Typer(
    help="The tiny demo guest: a real Linux VM that keeps writing to its data disk.", no_args_is_help=True
)
app.add_typer(vm_app, name="vm")

out = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="hotvm.yaml (default: $HOTVM_CONFIG or ./hotvm.yaml)")
]
TargetOpt = Annotated[
    str | None, typer.Option("--target", "-t", help="target name (default: the only or default one)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")]


def _prefect_env(verbose: bool = False) -> None:
    """Quiet, robust defaults for Prefect's embedded server; the user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Failures reach the user as one line from hotvm; Prefect's tracebacks only with --verbose.
    os.environ["PREFECT_LOGGING_LEVEL"] = "INFO" if verbose else "CRITICAL"
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # the embedded server: it must die with this process, even SIGKILLed
        from flows._embedded_server import install

        install()


def _cfg(config: Path | None) -> str | None:
    return str(config) if config else None


def _emit(result: Any, as_json: bool, render) -> None:  # noqa: ANN001
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(result)


@contextmanager
def _progress_bars(enabled: bool):
    """Rich bars on stderr, fed by the export/restore progress events emitted inside the tasks."""
    if not enabled:
        yield
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bars:
        ids: dict[str, int] = {}

        def listener(activity: str, item: str, done: int, total: int) -> None:
            key = f"{activity} {item}"
            if key not in ids:
                ids[key] = bars.add_task(key, total=total or 1)
            bars.update(ids[key], completed=done, total=total or 1)

        progress_events.set_listener(listener)
        try:
            yield
        finally:
            progress_events.set_listener(None)


def main() -> None:
    try:
        app()
    except HotvmError as exc:
        _fail_and_exit(exc)
    except RuntimeError as exc:
        if "Failed to reach API" not in str(exc):
            raise
        _fail_and_exit(
            HotvmError(
                f"cannot reach the Prefect server at {os.environ.get('PREFECT_API_URL')}",
                "start it (prefect server start), or unset PREFECT_API_URL to use the embedded one",
            )
        )


def _fail_and_exit(exc: HotvmError) -> None:
    """One line saying what failed, one saying what to do; exit code 2."""
    err.print(f"[bold red]error:[/] {exc.message}")
    if exc.hint:
        err.print(f"  [yellow]fix:[/] {exc.hint}")
    sys.exit(2)


# ----------------------------------------------------------------------------- backup / restore / list


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect logs")] = False,
) -> None:
    """Back up a running VM hot (weekly-image flow for one VM); resumes an unfinished set of it.
    With --all: every VM of a policy, concurrently within each host's limit, reported per VM."""
    _prefect_env(verbose)
    if all_vms or vm is None:
        if vm is not None or not all_vms:
            raise HotvmError("give either a VM name or --all", "hotvm backup VM, or hotvm backup --all")
        _backup_all(policy, target, config, as_json)
        return
    from hotvm.models import load_config
    from hotvm.restore import open_repository

    cfg = load_config(config)
    cfg.find_vm(vm)
    resume_id = None
    if not new:
        sets = open_repository(cfg, target).list_sets(vm)
        if sets and not sets[-1].complete:
            resume_id = sets[-1].backup_id
            err.print(f"resuming unfinished backup set {resume_id} (use --new for a fresh one)")
    from flows.backup_vm import backup_vm

    with _progress_bars(not as_json):
        result = backup_vm(vm=vm, target=target, config=_cfg(config), backup_id=resume_id)
    _emit(result, as_json, _render_backup)


def _backup_all(policy: str, target: str | None, config: Path | None, as_json: bool) -> None:
    from flows._fleet import BackupsFailed, report_rows
    from flows.backup_policy import backup_policy
    from hotvm.models import load_config

    load_config(config).find_policy(policy)  # a clear error before any flow starts
    try:
        results, failed = backup_policy(policy=policy, config=_cfg(config), target=target), None
    except BackupsFailed as exc:
        results, failed = exc.results, exc
    _emit(report_rows(results), as_json, _render_backup_all)
    if failed is not None:
        err.print(f"[bold red]error:[/] {failed.message}")
        raise typer.Exit(1)


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


@app.command()
def restore(
    vm: Annotated[str, typer.Argument(help="VM name as backed up")],
    to: Annotated[
        Path | None, typer.Option("--to", help="new or empty directory for the restored files")
    ] = None,
    backup_id: Annotated[
        str | None, typer.Option("--backup", help="backup id (default: latest complete)")
    ] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw")] = "qcow2",
    boot_check: Annotated[
        bool, typer.Option("--boot-check", help="boot the restored VM isolated and time it")
    ] = False,
    from_tape: Annotated[
        str | None, typer.Option("--from-tape", help="read the backup straight from this tape (tapes:)")
    ] = None,
    hybrid: Annotated[
        bool, typer.Option("--hybrid", help="image as raw + the newest file backup applied (docs/files.md)")
    ] = False,
    to_host: Annotated[
        str | None,
        typer.Option("--to-host", help="register the restored VM on this host (disks in its vm_dir/NAME)"),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="with --to-host: name of the copy (new UUID and MACs)")
    ] = None,
    start: Annotated[
        bool, typer.Option("--start", help="with --to-host or --instant: start the restored VM")
    ] = False,
    instant: Annotated[
        bool,
        typer.Option("--instant", help="run the VM from the backup now, stream its disks home (instant.md)"),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="with --instant: return when the disks are local")
    ] = False,
    speed: Annotated[
        int, typer.Option("--speed", help="with --instant: stream at most this many bytes/s (0: unlimited)")
    ] = 0,
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Restore a VM's disks (verified chunk by chunk) and config files into a directory; --to-host also
    registers it on a host (any driver), as --name with a new identity, powered off unless --start;
    --instant --start runs it at once from the backup while its disks stream into --to (rerun: resume)."""
    _prefect_env(verbose)
    if instant:
        from hotvm.cli_instant import instant_restore_cmd

        if to is None or to_host or hybrid or from_tape:
            raise HotvmError("--instant needs --to DIR", "and no --to-host, --hybrid or --from-tape")
        instant_restore_cmd(vm, to, backup_id, target, config, start, wait, speed, as_json)
        return
    if to is None and (to_host is None or hybrid or from_tape):
        raise HotvmError("give a destination", "pass --to DIR (or --to-host HOST to register the VM there)")
    if (name or start) and to_host is None:
        raise HotvmError("--name and --start need --to-host", "add --to-host HOST")
    if hybrid:
        from hotvm.cli_files import hybrid_restore_cmd

        hybrid_restore_cmd(vm, to, backup_id, target, config, as_json)
        return
    from flows.restore_vm import restore_vm

    if from_tape:
        if boot_check:
            raise HotvmError("--boot-check is not available with --from-tape", "restore, then boot-check it")
        from flows.tape_copy import tape_restore

        result = tape_restore(
            vm=vm, tape=from_tape, to=str(to), backup_id=backup_id, fmt=fmt, config=_cfg(config)
        )
        _emit(result, as_json, _render_restore)
        return
    with _progress_bars(not as_json):
        result = restore_vm(
            vm=vm,
            to=str(to) if to is not None else None,
            backup_id=backup_id,
            target=target,
            fmt=fmt,
            boot_check_restored=boot_check,
            config=_cfg(config),
            to_host=to_host,
            name=name,
            start=start,
        )
    _emit(result, as_json, _render_restore)


def _render_restore(result: dict) -> None:
    out.print(f"[bold green]restored {result['vm']} {result['backup_id']} into {result['to']}[/]")
    for disk in result["disks"]:
        out.print(f"  {disk['device']}: {disk['path']} ({disk['format']}, {disk['bytes'] >> 20} MiB)")
    check = result.get("boot_check")
    if check:
        state = "[green]came up[/]" if check["ok"] else "[red]did not come up[/]"
        out.print(f"boot check: {state} in {check['seconds']:.1f} s (measured recovery time)")
    reg = result.get("registered")
    if reg:
        started = ", started" if reg["started"] else ", powered off"
        where = f"host {reg['host']}: {reg['action']}{started}"
        out.print(f"registered {reg['name']} on {where} ({reg['location']})")


@app.command("sync-config")
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Register each VM's latest backed-up config on its standby host, powered off (seed: VMX sync)."""
    _prefect_env(verbose)
    from flows.sync_config import sync_config
    from hotvm.errors import RunFailed

    try:
        rows, failed = sync_config(vm=vm, standby=standby, with_disks=with_disks, target=target,
                                   config=_cfg(config)), None  # fmt: skip
    except RunFailed as exc:
        rows, failed = exc.results, exc
    _emit(rows, as_json, _render_sync)
    if failed is not None:
        err.print(f"[bold red]error:[/] {failed.message}")
        raise typer.Exit(1)


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


@app.command("list")
def list_backups(
    vm: Annotated[str | None, typer.Argument(help="only this VM")] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the backup sets on a target (incomplete ones are marked and never restored)."""
    from hotvm.restore import open_repository

    entries = open_repository(config, target).list_sets(vm)
    rows = [
        {
            "vm": e.vm,
            "backup_id": e.backup_id,
            "complete": e.complete,
            "completed_at": e.manifest.completed_at.isoformat() if e.manifest else None,
            "disks": [d.device for d in e.manifest.disks] if e.manifest else [],
            "bytes": sum(d.virtual_size for d in e.manifest.disks) if e.manifest else 0,
            "consistency": e.manifest.consistency if e.manifest else None,
        }
        for e in entries
    ]

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

    _emit(rows, as_json, render)


@app.command("copy")
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

    result = copy_between(_cfg(config), source, to, vms or None, workers=workers).summary()

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

    _emit(result, as_json, render)


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every configured VM: reachable?, disks and their modes, hotvm overlays still on them, block jobs."""
    from hotvm.models import load_config
    from hotvm.status import instant_status_rows, vm_status

    cfg = load_config(config)
    rows = [vm_status(host, vm) for host in cfg.hosts for vm in host.vm_list()]
    rows += instant_status_rows()

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

    _emit(rows, as_json, render)


# ----------------------------------------------------------------------------- demo guest

StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="where demo VMs live (default .hotvm/vms)")
]


def _vm_row(vm) -> dict:  # noqa: ANN001 - hotvm.guest.VMStatus
    return {
        "name": vm.name,
        "running": vm.running,
        "pid": vm.pid,
        "qmp": str(vm.qmp),
        "disk": str(vm.disk),
        "format": vm.fmt,
        "serial_log": str(vm.serial_log),
        "accel": vm.accel,
    }


@vm_app.command("create")
def vm_create(
    name: str,
    size: Annotated[str, typer.Option("--size", help="data disk size, e.g. 64M, 1G")] = "64M",
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw")] = "qcow2",
    state_dir: StateOpt = None,
    agent: Annotated[
        bool, typer.Option("--agent", help="with qemu-ga and an ext4 disk to quiesce (docs/standby.md)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a demo VM (kernel + busybox initramfs + data disk) and print its hotvm.yaml entry."""
    import yaml

    from hotvm import guest

    vm = guest.create_vm(name, data_size=size, fmt=fmt, state_dir=state_dir, agent=agent)
    entry = guest.vm_config_entry(name, state_dir=state_dir)

    def render(entry: dict) -> None:
        out.print(f"created {name} in {vm.dir}; start it with: hotvm vm start {name}")
        out.print("add it to hotvm.yaml under hosts[].vms:")
        out.print(yaml.safe_dump([entry], sort_keys=False), markup=False)

    _emit(entry, as_json, render)


@vm_app.command("start")
def vm_start(name: str, state_dir: StateOpt = None, wait: bool = True, as_json: JsonOpt = False) -> None:
    """Boot a demo VM (daemonized); waits until the guest is up and writing."""
    from hotvm import guest

    vm = guest.start_vm(name, state_dir=state_dir)
    if wait:
        guest.wait_ready(name, timeout=180, state_dir=state_dir)
    _emit(
        _vm_row(guest.get_vm(name, state_dir)),
        as_json,
        lambda r: out.print(
            f"{name} running (pid {r['pid']}, {r['accel']}), QMP {r['qmp']}, console {vm.serial_log}"
        ),
    )


@vm_app.command("stop")
def vm_stop(name: str, state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Shut a demo VM down (QMP quit, then signals)."""
    from hotvm import guest

    was_running = guest.stop_vm(name, state_dir=state_dir)
    _emit(
        {"name": name, "was_running": was_running},
        as_json,
        lambda r: out.print(f"{name} {'stopped' if was_running else 'was not running'}"),
    )


@vm_app.command("list")
def vm_list(state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """The demo VMs and whether they run."""
    from hotvm import guest

    rows = [_vm_row(vm) for vm in guest.list_vms(state_dir)]

    def render(rows: list[dict]) -> None:
        table = Table("name", "state", "pid", "disk", "qmp")
        for r in rows:
            table.add_row(
                r["name"], "running" if r["running"] else "stopped", str(r["pid"] or ""), r["disk"], r["qmp"]
            )
        out.print(table)

    _emit(rows, as_json, render)


# ----------------------------------------------------------------------------- prune / check

def _keep(flag: str, help_text: str) -> Any:
    return Annotated[int | None, typer.Option(flag, min=0, help=help_text, show_default=False)]


KeepLast = _keep("--keep-last", "keep the N newest sets")
KeepDays = _keep("--keep-days", "keep every set younger than N days")
KeepDaily = _keep("--keep-daily", "keep the newest set of each of the N newest days")
KeepWeekly = _keep("--keep-weekly", "the newest of each of N ISO weeks")
KeepMonthly = _keep("--keep-monthly", "the newest of each of N months")
KeepYearly = _keep("--keep-yearly", "the newest of each of N years")


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect logs")] = False,
) -> None:
    """Remove the backup sets the target's keep: policy does not keep (any --keep-* flag replaces the
    policy), then the chunks no remaining set references (prune flow). The newest complete backup of a VM
    and sets of backups that may still be running always stay."""
    _prefect_env(verbose)
    from flows.prune import prune as prune_flow

    result = prune_flow(
        target=target, vm=vm, dry_run=dry_run, config=_cfg(config), keep_last=keep_last, keep_days=keep_days,
        keep_daily=keep_daily, keep_weekly=keep_weekly, keep_monthly=keep_monthly, keep_yearly=keep_yearly,
    )
    _emit(result, as_json, _render_prune)


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


@app.command()
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
    from hotvm.prune import opened

    with opened(config, target) as repo:
        report = check_repository(repo, read_data=read_data)
    result = report.summary()
    _emit(result, as_json, _render_check)
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


# ----------------------------------------------------------------------------- tape copies

tape_app = typer.Typer(help="Tape copies of the image repository (seed Table 7.3).", no_args_is_help=True)
app.add_typer(tape_app, name="tape")
TapeOpt = Annotated[str, typer.Option("--tape", help="tape name from hotvm.yaml (tapes:)")]


@tape_app.command("copy")
def tape_copy_cmd(
    tape: TapeOpt,
    vms: Annotated[list[str] | None, typer.Argument(help="only these VMs (default: every VM)")] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect logs")] = False,
) -> None:
    """Copy the complete backup sets of a target to tape as one new, self-contained copy (tape-copy flow)."""
    _prefect_env(verbose)
    from flows.tape_copy import artifact_rows, tape_copy

    result = tape_copy(tape=tape, target=target, vms=vms or None, config=_cfg(config))

    def render(result: dict) -> None:
        table = Table("vm", "backup", "where", "MiB", "chunks", "sha256")
        for r in artifact_rows(result):
            table.add_row(r["vm"], r["backup"], r["where"], str(r["MiB"]), str(r["chunks"]), r["sha256"])
        out.print(table)
        out.print(
            f"[bold green]tape copy {result['copy_id']}[/] of '{result['target']}' on "
            f"{', '.join(result['media'])}, expires {result['expires'][:16]}; "
            f"catalog: {result['catalog_path']}"
        )

    _emit(result, as_json, render)


@tape_app.command("list")
def tape_list_cmd(tape: TapeOpt, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Read every medium of the tape forward: labels, files, the sets on it and when it expires."""
    from hotvm.tape import media_rows, open_tape
    from hotvm.tape.copy import catalogs_from_scan, scan_library

    library = open_tape(config, tape)
    states = scan_library(library)
    rows = media_rows(library, states, catalogs_from_scan(states))

    def render(rows: list[dict]) -> None:
        table = Table("medium", "copies", "files", "sets", "expires", "free")
        for r in rows:
            kinds = ", ".join(f"{f['file']}:{f['kind']}" for f in r["files"]) or "blank"
            free = f"{r['free_bytes'] >> 20} MiB" if r["free_bytes"] is not None else "?"
            copies = ", ".join(r["copies"]) + (" (incomplete: " + ", ".join(r["incomplete_copies"]) + ")"
                                              if r["incomplete_copies"] else "")
            table.add_row(r["medium"], copies, kinds, "\n".join(r["sets"]), r["expires"] or "reusable", free)
        out.print(table)

    _emit(rows, as_json, render)


# ------------------------------------------------------------------------- restore tests, recovery by tier


def _run_reporting(flow_call, as_json: bool, render) -> None:  # noqa: ANN001
    """Run a flow that raises RunFailed with its per-VM results: print them either way, exit 1 on failure."""
    from hotvm.errors import RunFailed

    state = flow_call(return_state=True)
    if state.is_completed():
        _emit(state.result(), as_json, render)
        return
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, RunFailed):
        _emit(exc.results, as_json, render)
        err.print(f"[bold red]error:[/] {exc.message}")
        raise typer.Exit(1)
    if isinstance(exc, BaseException):
        raise exc
    raise HotvmError(state.message or "the run failed", "rerun with --verbose")


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Restore-test backups in a scratch directory: every chunk checked (--boot: booted with no network),
    result recorded beside the set. Exits 1 if any test fails, naming the damaged chunk or file."""
    _prefect_env(verbose)
    from flows.verify import verify as verify_flow

    def call(return_state: bool):  # noqa: ANN202
        return verify_flow(
            vm=vm, backup_id=backup_id, target=target, boot=boot, keep=keep, sample=sample,
            config=_cfg(config), return_state=return_state,
        )

    _run_reporting(call, as_json, _render_verify)


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


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Restore all VMs of a tier in recovery order, at most each host's max_concurrent_backups at once;
    reports measured time vs RTO per VM. Exits 1 if a VM fails or misses its RTO."""
    _prefect_env(verbose)
    from flows.recover import recover as recover_flow

    def call(return_state: bool):  # noqa: ANN202
        return recover_flow(
            tier=tier, to=str(to), target=target, boot_check=boot_check, fmt=fmt, config=_cfg(config),
            return_state=return_state,
        )

    _run_reporting(call, as_json, _render_recover)


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


# ----------------------------------------------------------------------------- plan: RPO/RTO/tiers, DR plan

plan_app = typer.Typer(help="RPO, RTO and tiers per VM; the DR plan document.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")


@plan_app.command("check")
def plan_check_cmd(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Check every VM: schedules meet its RPO, file-level backup if it asks for file restores, last
    measured restore within its RTO. Prints the violations; exits 1 if there are any."""
    from hotvm.models import load_config
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

    _emit(violations, as_json, render)
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
    from hotvm.models import load_config
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


# ----------------------------------------------------------------------------- inventory


@app.command("inventory")
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
    from hotvm.models import load_config

    fmt = "json" if as_json and fmt is None else fmt
    if fmt is not None and fmt not in inventory.FORMATS:
        raise HotvmError(f"unknown format '{fmt}'", f"use one of: {', '.join(inventory.FORMATS)}")
    if fmt == "xlsx" and output is None:
        raise HotvmError("xlsx is a binary file", "add --output FILE.xlsx")
    cfg = load_config(config)
    inv = inventory.collect(cfg)
    if target is not None:
        from hotvm.prune import opened

        with opened(cfg, target) as repo:
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


# ----------------------------------------------------------------------------- target identities

target_app = typer.Typer(help="What this host remembers of each target's repository.", no_args_is_help=True)
app.add_typer(target_app, name="target")


@target_app.command("forget")
def target_forget_cmd(
    name: Annotated[str, typer.Argument(help="target name from hotvm.yaml")], config: ConfigOpt = None
) -> None:
    """Forget the repository identity remembered for a target (after re-creating it on purpose): the next
    run takes whatever repository it finds there, or creates one, as on first use."""
    from hotvm.formats.identity import IdentityStore, location_of
    from hotvm.models import load_config

    target = load_config(_cfg(config)).find_target(name)
    location = location_of(target.url, target.endpoint_url)  # no connection needed
    if IdentityStore().forget(location):
        err.print(f"forgot the repository identity of target '{name}' ({location})")
    else:
        err.print(f"nothing remembered for target '{name}' ({location})")


from hotvm.cli_files import files_app  # noqa: E402 - it imports the options defined above

app.add_typer(files_app, name="files")

from hotvm.cli_prefect import notifications_app, prefect_app  # noqa: E402 - it imports the options above

app.add_typer(prefect_app, name="prefect")
app.add_typer(notifications_app, name="notifications")
