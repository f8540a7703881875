"""`hotvm restore VM --instant --to DIR`: run the VM from its backup now, stream its disks home.

The CLI calls the core directly, not the `instant-restore` flow: starting Prefect's embedded server costs
10-17 s here, longer than the whole time to ready this command exists for. The deployment runs the same
steps as tasks (flows/instant_restore.py).
"""

from __future__ import annotations

from pathlib import Path

from hotvm import progress as progress_events
from hotvm.cli._common import config_str
from hotvm.cli._output import emit, out, progress_bars


def instant_restore_cmd(
    vm: str,
    to: Path,
    backup_id: str | None,
    target: str | None,
    config: Path | None,
    start: bool,
    wait: bool,
    speed: int,
    as_json: bool,
) -> None:
    from hotvm.instant.core import instant_restore

    def progress(device: str, done: int, total: int) -> None:
        progress_events.emit("stream", f"{vm}/{device}", done, total)

    with progress_bars(wait and not as_json):
        result = instant_restore(
            config_str(config), vm, to, backup_id, target, start=start, wait=wait, speed=speed,
            progress=progress,
        )
    emit(result, as_json, render_instant)


def render_instant(r: dict) -> None:
    what = "running" if r["running"] and r["runner"] == "vm" else "not started"
    out.print(f"[bold green]instant restore of {r['vm']} {r['backup_id']} into {r['to']}: VM {what}[/]")
    if r["running"] and r["runner"] == "vm":
        out.print(f"  QMP {r['qmp']}, serial log {r['serial_log']}, pid {r['pid']}")
    for disk in r["disks"]:
        where = "[yellow]reads the repository[/]" if disk["depends_on_repository"] else "local"
        out.print(f"  {disk['device']}: {disk['path']} ({disk['bytes'] >> 20} MiB, {where})")
    if r["status"] == "complete":
        took = f" in {r['stream_seconds']:.1f} s" if r["stream_seconds"] is not None else ""
        out.print(f"stream complete{took}: the VM no longer needs target '{r['target']}'")
    elif r["error"]:
        out.print(f"[red]stream stopped: {r['error']}[/]")
    else:
        out.print(f"streaming from target '{r['target']}'; `hotvm status` shows the progress")
