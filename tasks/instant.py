"""The steps of an instant restore (hotvm.instant.core), one task each; the state lives in the restore
directory (instant.json), so every task re-reads it and a retried or rerun step resumes."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from hotvm.instant import core
from hotvm.instant.state import InstantState, load_state
from tasks._options import STEP


def _state(to: str) -> InstantState:
    state = load_state(Path(to).resolve())
    assert state is not None, f"no instant restore in {to}"
    return state


@task(name="prepare_overlays", **STEP)
def prepare(vm: str, to: str, backup_id: str | None, target: str | None, start: bool, speed: int,
            config: str | None) -> dict:  # fmt: skip
    """The restore directory: one local qcow2 overlay per disk over the repository (or the ones an
    earlier run left: resumed)."""
    state = core.refresh(core.prepare(config, vm, to, backup_id, target, start=start, speed=speed))
    return {"to": state.dest, "status": state.status, "backup_id": state.backup_id}


@task(name="expose_backup", **STEP)
def expose(to: str, config: str | None) -> int | None:
    """nbdkit serves the set's disks read-only from the repository, verifying every chunk it serves."""
    return core.expose(config, _state(to))


@task(name="start_vm", retries=0)
def run(to: str) -> float | None:
    """The VM on its overlays (or qemu-storage-daemon when it is not started); seconds to ready."""
    state = _state(to)
    launched = core.run(state)
    if launched is None or state.runner != "vm":
        return None
    try:
        seconds = core.wait_ready(state, launched)
    except core.NotReady as exc:  # it runs: the stream goes on; only the time to ready is unknown
        get_run_logger().warning("%s", exc.message)
        return None
    get_run_logger().info("%s is up %.1f s after launch, from the backup", state.vm, seconds)
    return seconds


@task(name="start_stream", **STEP)
def start_stream(to: str) -> list[str]:
    return core.start_stream(_state(to))


@task(name="stream", retries=0)
def stream(to: str) -> dict:
    """block-stream until every disk is local, shown as a progress artifact; then the repository is let
    go. A failure names the damaged chunk, the unreachable target or the full disk; rerun to resume."""
    state = _state(to)
    artifact = create_progress_artifact(0.0, description=f"stream of {state.vm} into {state.dest}")
    done: dict[str, tuple[int, int]] = {}

    def progress(device: str, current: int, total: int) -> None:
        done[device] = (current, total)
        got, want = sum(c for c, _ in done.values()), sum(t for _, t in done.values())
        if want:
            update_progress_artifact(artifact, round(100 * got / want, 1))

    core.wait_stream(state, progress)
    update_progress_artifact(artifact, 100.0)
    return core.result(state)
