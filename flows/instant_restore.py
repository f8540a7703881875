"""instant-restore: run a VM straight from its backup set, then move its disks home while it runs.

Reads like the runbook: overlays over the backup, the backup exposed read-only, the VM started on it (its
time to ready measured), the stream started, and (wait) the stream as a task with a progress artifact.
Rerunning the same parameters resumes whatever an earlier run left: docs/instant.md.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from hotvm.instant.core import result
from hotvm.instant.state import load_state
from tasks.instant import expose, prepare, run, start_stream, stream


@flow(name="instant-restore")
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
    """Instant restore of `vm` into the directory `to` (same `to` again: resume)."""
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
