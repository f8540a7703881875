"""instant-restore: run a VM straight from its backup set, then move its disks home while it runs.

Reads like the runbook: overlays over the backup, the backup exposed read-only, the VM started on it (its
time to ready measured), the stream started, and (wait) the stream as a task with a progress artifact.
Rerunning the same parameters resumes whatever an earlier run left: docs/instant.md.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows._handoff import handed_off
from flows._runs import host_of, vm_run_name
from hotvm.instant.core import result
from hotvm.instant.state import load_state
from tasks.instant import expose, prepare, run, start_stream, stream


@flow(name="instant-restore", flow_run_name=vm_run_name("instant-restore"))
def instant_restore(
    vm: str,
    to: str,
    backup_id: str | None = None,
    target: str | None = None,
    start: bool = True,
    wait: bool = True,
    speed: int = 0,
    config: str | None = None,
) -> dict:
    """Instant restore of `vm` into the directory `to` (same `to` again: resume).

    Args:
        vm: The VM's name in hotvm.yaml (its backups on the target).
        to: Directory on this host for the overlays, the local disks and the state (instant.json).
        backup_id: The backup set to run from; empty: the VM's latest complete one.
        target: The target's name in hotvm.yaml; empty: the default target.
        start: Start the VM on the backup (else only stream the disks home, no VM).
        wait: Return only when every disk has streamed home.
        speed: Stream speed limit in bytes/s; 0: unlimited.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    if (handed := handed_off("instant", vm, host_of(vm, config), config, strict=False)) is not None:
        return handed  # started on fleet from the UI: run on the VM's host (or pick a host's queue)
    prepared = prepare(vm, to, backup_id, target, start, speed, config)
    ready = None
    if prepared["status"] != "complete":
        expose(prepared["to"], config)
        ready = run(prepared["to"])
        start_stream(prepared["to"])
        if wait:
            stream(prepared["to"])
    elif start:
        ready = run(prepared["to"])
    state = load_state(Path(prepared["to"]))
    assert state is not None
    out = result(state) | {"ready_seconds": ready}
    get_run_logger().info(
        "%s %s: %s, %s", vm, out["backup_id"], "running" if out["running"] else "not running",
        "disks local" if not out["depends_on_repository"] else "streaming from the repository",
    )  # fmt: skip
    return out
