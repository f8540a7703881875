"""`hotvm restore VM`: into a directory, onto a host, from tape, hybrid or instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import emit, out, progress_bars
from hotvm.errors import HotvmError


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
    verbose: VerboseOpt = False,
) -> None:
    """Restore a VM's disks (verified chunk by chunk) and config files into a directory; --to-host also
    registers it on a host (any driver), as --name with a new identity, powered off unless --start;
    --instant --start runs it at once from the backup while its disks stream into --to (rerun: resume)."""
    prefect_env(verbose)
    if instant:
        from hotvm.cli.instant_cmd import instant_restore_cmd

        if to is None or to_host or hybrid or from_tape:
            raise HotvmError("--instant needs --to DIR", "and no --to-host, --hybrid or --from-tape")
        instant_restore_cmd(vm, to, backup_id, target, config, start, wait, speed, as_json)
        return
    if to is None and (to_host is None or hybrid or from_tape):
        raise HotvmError("give a destination", "pass --to DIR (or --to-host HOST to register the VM there)")
    if (name or start) and to_host is None:
        raise HotvmError("--name and --start need --to-host", "add --to-host HOST")
    if hybrid:
        from hotvm.cli.files_cmd import hybrid_restore_cmd

        hybrid_restore_cmd(vm, to, backup_id, target, config, as_json)
        return
    from flows.restore_vm import restore_vm

    if from_tape:
        if boot_check:
            raise HotvmError("--boot-check is not available with --from-tape", "restore, then boot-check it")
        from flows.tape_copy import tape_restore

        result = tape_restore(
            vm=vm, tape=from_tape, to=str(to), backup_id=backup_id, fmt=fmt, config=config_str(config)
        )
        emit(result, as_json, _render_restore)
        return
    with progress_bars(not as_json):
        result = restore_vm(
            vm=vm,
            to=str(to) if to is not None else None,
            backup_id=backup_id,
            target=target,
            fmt=fmt,
            boot_check_restored=boot_check,
            config=config_str(config),
            to_host=to_host,
            name=name,
            start=start,
        )
    emit(result, as_json, _render_restore)


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
