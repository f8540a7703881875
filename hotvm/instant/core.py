"""Instant recovery as plain steps: boot a VM straight from its backup set, then stream its disks home.

    prepare      the restore directory: instant.json (0600), one qcow2 overlay per disk over the export
    expose       nbdkit serving the set's disks read-only from the repository (verified chunks)
    run          the VM on the overlays (or qemu-storage-daemon when it is not to be started)
    stream       block-stream every disk into its overlay; when all finished, nothing depends on the
                 repository any more: the export exits, the chunk cache is removed, status "complete"

Every step is idempotent: the same command on the same directory resumes (a dead export or runner is
started again, clusters already local are not copied again), so nothing written by the guest is lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from hotvm.bootcheck import default_accel
from hotvm.config import BootCheckSpec, Config
from hotvm.config_file import load_config
from hotvm.errors import BlockJobError, HotvmError
from hotvm.formats.opener import open_repository
from hotvm.formats.repository import safe_name
from hotvm.hypervisors.qmp import Monitor
from hotvm.instant import export, runner
from hotvm.instant.state import InstantDisk, InstantState, load_state, now, run_dir_for
from hotvm.restore import prepare_destination

DEFAULT_CACHE_BYTES = 2 << 30
DEFAULT_UNREACHABLE_WAIT_S = 60.0


class NotReady(HotvmError):
    """The VM runs but its boot spec's ready pattern did not show in time."""


class StreamError(HotvmError):
    """The stream stopped before the disks were local; the VM keeps running on overlay + repository."""


def prepare(
    config: Config | str | Path | None,
    vm: str,
    to: str | Path,
    backup_id: str | None = None,
    target: str | None = None,
    *,
    start: bool = True,
    speed: int = 0,
) -> InstantState:
    """The restore directory's state: a new one (empty directory, overlays created) or the one a
    previous run left there (to resume it)."""
    cfg = load_config(config)
    dest = Path(to).resolve()
    state = load_state(dest) if dest.is_dir() else None
    if state is not None:
        if state.vm != vm or (backup_id and backup_id != state.backup_id):
            raise HotvmError(
                f"{dest} holds the instant restore of {state.vm} {state.backup_id}",
                "resume that one (same VM, no other --backup), or restore into a new directory",
            )
        state.speed = speed  # each run says how fast (0: unlimited); a rerun without --speed is not slowed
        if start and state.runner == "storage-daemon" and state.status != "complete":
            switch_to_vm(state)
        state.save()
        return state
    with open_repository(cfg, target) as repo:
        manifest = repo.find(vm, backup_id)
    prepare_destination(dest)
    run_dir = run_dir_for(dest)
    remote = repo.target.scheme != "file"
    cache = dest / ".chunk-cache" if remote else None
    disks = [
        InstantDisk(device=d.device, overlay=str(dest / f"{safe_name(d.device)}.qcow2"), node=f"inst{i}",
                    virtual_size=d.virtual_size)
        for i, d in enumerate(manifest.disks)
    ]  # fmt: skip
    state = InstantState(
        vm=manifest.vm, backup_id=manifest.backup_id, target=repo.target.name, dest=str(dest),
        run_dir=str(run_dir), cache_dir=str(cache) if cache else None,
        runner="vm" if start else "storage-daemon", speed=speed, created_at=now(), disks=disks,
    )  # fmt: skip
    for disk in disks:
        runner.create_overlay(state, disk)
    (dest / "boot-spec.json").write_text((manifest.boot_check or BootCheckSpec()).model_dump_json(indent=2))
    state.save()
    return state


def switch_to_vm(state: InstantState) -> None:
    """A restore started without --start, now to be started: the storage daemon lets go of the overlays
    (its stream is cancelled; what it copied stays in them) and the VM takes over."""
    if runner.running_pid(state) is not None:
        mon = Monitor(state.qmp, state.vm)
        try:
            runner.cancel_streams(mon, state)
        finally:
            mon.close()
        runner.stop(state)
    state.runner = "vm"


def boot_spec(state: InstantState) -> BootCheckSpec:
    return BootCheckSpec.model_validate_json((Path(state.dest) / "boot-spec.json").read_text())


def expose(
    config: Config | str | Path | None,
    state: InstantState,
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    unreachable_wait_s: float = DEFAULT_UNREACHABLE_WAIT_S,
    tuning: dict | None = None,
) -> int | None:
    """Start the NBD export unless it runs or nothing needs it any more; its pid (None: not needed)."""
    if not any(runner.depends_on_repository(d) for d in state.disks):
        return None
    pid = export.export_pid(Path(state.run_dir))
    if pid is not None:
        return pid
    with open_repository(config, state.target) as repo:
        manifest = repo.load_manifest(state.vm, state.backup_id)
        cache = Path(state.cache_dir) if state.cache_dir else None
        payload = export.bundle(repo, manifest, cache, cache_bytes, unreachable_wait_s)
    tuning = tuning or {}  # bench/instant.py's alternatives: read_ahead, nbdkit filters
    payload.update({k: v for k, v in tuning.items() if k in ("read_ahead", "zero_flag")})
    return export.start_export(Path(state.run_dir), payload, tuple(tuning.get("filters", ())))


def run(state: InstantState, accel: str | None = None) -> float | None:
    """Start the VM (or the storage daemon) unless it runs; time.monotonic() of the launch, or None."""
    if runner.running_pid(state) is not None:
        return None
    spec = boot_spec(state) if state.runner == "vm" else None
    return runner.launch(state, spec, accel or default_accel())


def wait_ready(state: InstantState, since: float, timeout: float | None = None) -> float:
    """Seconds from `since` to the boot spec's ready pattern on the serial console (the time to ready)."""
    import re

    spec = boot_spec(state)
    pattern = re.compile(spec.ready_pattern)
    deadline = since + (timeout or spec.timeout_s)
    reported = Path(state.run_dir) / "problems.jsonl"  # this export's (export.start_export starts it anew)
    while True:
        text = state.serial_log.read_text(errors="replace") if state.serial_log.exists() else ""
        if pattern.search(text):
            return round(time.monotonic() - since, 3)
        if reported.exists():
            damaged = [p["error"] for p in problems(state) if "error" in p]
            if damaged:  # the guest cannot read its disk: it will not get ready, whatever the timeout
                raise NotReady(
                    f"the instant-restored {state.vm} cannot read its disks: {damaged[-1]}",
                    "restore another backup set (hotvm list shows them), or rerun after repairing the target",
                )
        if runner.running_pid(state) is None:
            raise HotvmError(
                f"the instant-restored {state.vm} stopped before '{spec.ready_pattern}'",
                f"see {state.serial_log} and {Path(state.run_dir) / 'qemu.log'}",
            )
        if time.monotonic() > deadline:
            raise NotReady(
                f"the instant-restored {state.vm}: no '{spec.ready_pattern}' within {spec.timeout_s:g} s",
                f"see {state.serial_log}",
            )
        time.sleep(0.05)


def start_stream(state: InstantState) -> list[str]:
    """Start (or resume) the stream of every disk that still depends on the repository."""
    mon = Monitor(state.qmp, state.vm)
    try:
        disks = runner.start_streams(mon, state)
    finally:
        mon.close()
    if disks:
        state.status = "streaming"
        state.error = None
        state.stream_started_at = state.stream_started_at or now()
        state.save()
    return [d.device for d in disks]


def wait_stream(state: InstantState, progress: Callable[[str, int, int], None] | None = None) -> InstantState:
    """Until every disk is local; then the repository is let go. StreamError (naming a damaged chunk, an
    unreachable target or a full disk) if a stream stopped: rerunning the restore resumes it."""
    mon = Monitor(state.qmp, state.vm)
    try:
        try:
            runner.wait_streams(mon, state, [d for d in state.disks], progress)
        except BlockJobError as exc:
            state.status, state.error = "stream-failed", _explain(state, exc.message)
            with contextlib.suppress(HotvmError):  # a full disk: the overlays say where the stream is
                state.save()
            raise StreamError(
                state.error,
                f"the VM keeps running on its overlays and the repository; fix the cause, then rerun "
                f"'hotvm restore {state.vm} --instant --to {state.dest}' to resume the stream",
            ) from None
        left = [d.device for d in state.disks if runner.repository_node_present(mon, d)]
    finally:
        mon.close()
    if left:
        raise StreamError(f"disks {', '.join(left)} of {state.vm} still read from the repository",
                          f"rerun 'hotvm restore {state.vm} --instant --to {state.dest}'")  # fmt: skip
    finish(state)
    return state


def finish(state: InstantState) -> None:
    """Nothing reads from the repository any more: stop the export, drop the cache, record it."""
    if any(runner.depends_on_repository(d) for d in state.disks):
        return
    export.stop_export(Path(state.run_dir))
    if state.runner == "storage-daemon":
        runner.stop(state)  # it only held the overlays for the stream
    if state.cache_dir:
        shutil.rmtree(state.cache_dir, ignore_errors=True)
    state.status = "complete"
    state.error = None
    state.stream_finished_at = state.stream_finished_at or now()
    if state.stream_started_at and state.stream_seconds is None:
        took = dt.datetime.fromisoformat(state.stream_finished_at) - dt.datetime.fromisoformat(
            state.stream_started_at
        )
        state.stream_seconds = round(took.total_seconds(), 3)
    state.save()


def refresh(state: InstantState) -> InstantState:
    """Bring the recorded status up to date with the images and the runner (for status and reruns)."""
    if state.status == "complete":
        return state
    if not any(runner.depends_on_repository(d) for d in state.disks):
        if runner.running_pid(state) is not None:
            mon = Monitor(state.qmp, state.vm, connect_timeout=3)
            try:
                for disk in state.disks:
                    with contextlib.suppress(HotvmError):
                        mon.cmd("job-dismiss", {"id": runner.job_id(disk)})
            finally:
                mon.close()
        finish(state)
    return state


def problems(state: InstantState) -> list[dict]:
    """What the export reported: damaged or missing chunks (by disk, index and name), unreachability."""
    path = Path(state.run_dir) / "problems.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _explain(state: InstantState, message: str) -> str:
    damaged = [p["error"] for p in problems(state) if "error" in p]
    if damaged:
        return f"{message} — {damaged[-1]}"
    if "No space left" in message:
        return f"{message} — the disk holding {state.dest} is full"
    unreachable = [p["unreachable"] for p in problems(state) if "unreachable" in p]
    if unreachable:
        return f"{message} — target '{state.target}' unreachable: {unreachable[-1]}"
    return message


def result(state: InstantState) -> dict:
    """The machine-readable result: the running VM's sockets and logs, its disks, the stream."""
    pid = runner.running_pid(state)
    disks = []
    for disk in state.disks:
        depends = runner.depends_on_repository(disk)
        disks.append({"device": disk.device, "path": disk.overlay, "format": "qcow2",
                      "bytes": disk.virtual_size, "depends_on_repository": depends})  # fmt: skip
    return {
        "vm": state.vm,
        "backup_id": state.backup_id,
        "target": state.target,
        "to": state.dest,
        "state_file": str(state.path),
        "runner": state.runner,
        "running": pid is not None,
        "pid": pid,
        "qmp": str(state.qmp_user),
        "serial_log": str(state.serial_log) if state.runner == "vm" else None,
        "disks": disks,
        "status": state.status,
        "error": state.error,
        "depends_on_repository": any(d["depends_on_repository"] for d in disks),
        "stream_seconds": state.stream_seconds,
        "problems": problems(state)[-5:],
    }


def instant_restore(
    config: Config | str | Path | None,
    vm: str,
    to: str | Path,
    backup_id: str | None = None,
    target: str | None = None,
    *,
    start: bool = True,
    wait: bool = False,
    speed: int = 0,
    accel: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """The whole instant restore without Prefect (the flow runs the same steps as tasks)."""
    cfg = load_config(config)
    state = prepare(cfg, vm, to, backup_id, target, start=start, speed=speed)
    refresh(state)
    ready = None
    if state.status != "complete":
        expose(cfg, state)
        ready = run_until_ready(state, accel)
        start_stream(state)
        if wait:
            wait_stream(state, progress)
    elif start:
        ready = run_until_ready(state, accel)  # a finished restore started again: on its local disks only
    return result(state) | {"ready_seconds": ready}


def run_until_ready(state: InstantState, accel: str | None = None) -> float | None:
    """Start the VM and wait for its ready pattern before the stream starts: the boot gets the host's CPU
    and I/O to itself (measured: a stream beside a booting TCG guest on 2 cores delayed its heartbeat
    1.8-2.6x, docs/instant.md). Seconds from launch to ready; None if it did not show (the VM still runs,
    the stream starts anyway) or the VM was already running."""
    launched = run(state, accel)
    if launched is None or state.runner != "vm":
        return None
    try:
        return wait_ready(state, launched)
    except NotReady:
        return None


def status_row(state: InstantState) -> dict:
    """`hotvm status` row of an instant restore: does the VM still depend on a repository, how far the
    stream got (from the running job), what stopped it."""
    state = refresh(state)
    pid = runner.running_pid(state)
    jobs, progress = [], []
    if pid is not None:
        mon = Monitor(state.qmp, state.vm, connect_timeout=3, command_timeout=10)
        try:
            for job in mon.cmd("query-jobs", retry=True):
                jobs.append(f"{job['id']} {job['type']} {job['status']}")
                total = int(job.get("total-progress") or 0)
                if total:
                    progress.append(int(job.get("current-progress", 0)) * 100 // total)
        except HotvmError:
            pass
        finally:
            mon.close()
    depends = [d for d in state.disks if runner.depends_on_repository(d)]
    what = "running" if pid is not None else "stopped"
    if state.runner == "storage-daemon" and pid is not None:
        what = "not started (storage daemon streams its disks)"
    if depends:
        where = f"depends on repository '{state.target}' ({state.backup_id})"
        if progress:
            where += f", stream {min(progress)}%"
        elif state.error:
            where += f", stream stopped: {state.error}"
        elif pid is None:
            where += f", stream paused: rerun 'hotvm restore {state.vm} --instant --to {state.dest}'"
        what = f"{what}; {where}"
    else:
        what = f"{what}; local disks (instant restore complete)"
    return {
        "host": "instant",
        "vm": state.vm,
        "state": what,
        "disks": [
            {"device": d.device, "mode": "instant", "path": d.overlay, "hotvm_overlays": [],
             "depends_on_repository": d in depends}
            for d in state.disks
        ],  # fmt: skip
        "jobs": jobs,
        "instant": {"to": state.dest, "status": state.status, "target": state.target,
                    "backup_id": state.backup_id, "depends_on_repository": bool(depends),
                    "running": pid is not None},  # fmt: skip
    }
