"""The hot-snapshot sequence the image backup and the file-level backup share, parameterised by the read.

    add_redo (all disks, one instant, + this run's dirty bitmaps) -> per disk: READ (export the disk, or
    scan its file systems) on the frozen base, add_redo, commit level 1, final commit -> FINISH (manifest)

(reconcile comes first, inside flows/_limits.backup_slot.) A failure anywhere, FINISH included, commits
the overlays back and drops this run's unused bitmaps before the run ends (flows/_rollback.py); the crash
and cancellation hooks do the same for a run that died. A rerun with the same backup id resumes: the
flows' plan step leaves out what the target already journals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows._handoff import handed_off
from flows._rollback import roll_back
from flows._runs import artifact_key, tag_this_run, vm_tags
from hotvm import backup
from hotvm.config import TaskRetries
from hotvm.formats.manifest import StepTiming
from hotvm.formats.repository import new_backup_id
from hotvm.hypervisors.base import FrozenDisk
from hotvm.locks import BackupRunning, vm_lock
from hotvm.policies import policy_for_vm
from tasks.commit import commit_disk
from tasks.redo import add_redo

T = TypeVar("T")


def rollback_hook(flow, run, state) -> None:  # noqa: ANN001 - Prefect hook signature
    """Crash or cancellation: the flow body's own rollback may not have run."""
    params = run.parameters or {}
    session = backup.open_session(params["vm"], params.get("config"))
    try:
        with vm_lock(session.host.name, session.vm.name):
            backup.reconcile(session)
    except BackupRunning:
        pass  # another run owns the VM now and reconciles it first thing


def run_backup_id() -> str:
    """Stable across retries of one flow run, so a retry resumes the same backup set."""
    if flow_run.id:
        return new_backup_id(flow_run.scheduled_start_time).rsplit("-", 1)[0] + "-" + str(flow_run.id)[:4]
    return new_backup_id()


def step_label(name: str, device: str | None) -> str:
    """The step as its task run is named in the UI ("export data", "commit data level 1"); `name` is the
    step as manifests record it (commit_level1, ...)."""
    if name.startswith("commit_") and device:
        return f"commit {device} {'level 1' if name == 'commit_level1' else 'final'}"
    return f"{name} {device}" if device else name


class Steps:
    """Runs each step task with the configured retries; records its wall-clock time for the manifest.

    A failing step's exception carries `hotvm_step` (e.g. "export data"): the per-VM report, the failure
    summary and the notifications name it."""

    def __init__(self, retries: TaskRetries) -> None:
        self.retries = retries
        self.timings: list[StepTiming] = []
        self.failed: str | None = None

    def run(self, name: str, device: str | None, fn: Task, *args: Any, **kwargs: Any) -> Any:
        step = fn.with_options(retries=self.retries.retries, retry_delay_seconds=self.retries.retry_delay_s)
        start = time.monotonic()
        try:
            result = step(*args, **kwargs)
        except BaseException as exc:
            if getattr(exc, "hotvm_step", None) is None:
                with contextlib.suppress(AttributeError):
                    exc.hotvm_step = step_label(name, device)
            self.failed = self.failed or getattr(exc, "hotvm_step", None)
            raise
        self.timings.append(StepTiming(step=name, device=device, seconds=round(time.monotonic() - start, 4)))
        return result


@dataclass
class Snapshot:
    """What the sequence did: the disks it froze, each disk's READ result, each final commit's stall."""

    frozen: list[FrozenDisk] = field(default_factory=list)
    read: dict[str, Any] = field(default_factory=dict)
    stall_ms: dict[str, float | None] = field(default_factory=dict)
    rolled_back: bool = False


def hot_snapshot(
    vm: str,
    config: str | None,
    backup_id: str,
    steps: Steps,
    devices: list[str],
    read: Callable[[FrozenDisk], Any],
    finish: Callable[[Snapshot], T],
    quiesce: bool = False,
) -> tuple[Snapshot, T]:
    """The shared sequence over `devices` (none: straight to `finish`). `read(disk)` runs the per-disk
    read step through `steps`; `finish(snapshot)` writes the manifest. Rolls back and re-raises on any
    failure."""
    snap = Snapshot()
    try:
        if devices:
            snap.frozen = steps.run(
                "add_redo", None, add_redo, vm, devices, backup_id, config,
                track_changes=True, quiesce=quiesce,
            )  # fmt: skip
            for disk in snap.frozen:
                snap.read[disk.device] = read(disk)
                steps.run("add_redo", disk.device, add_redo, vm, [disk.device], backup_id, config)
                steps.run("commit_level1", disk.device, commit_disk, vm, disk.device, 1, config)
                final = steps.run("commit_final", disk.device, commit_disk, vm, disk.device, "final", config)
                snap.stall_ms[disk.device] = final.stall_ms
        return snap, finish(snap)
    except BaseException:
        log = get_run_logger()
        log.error("%s of %s failed: committing its overlays back before the run ends", backup_id, vm)
        roll_back(vm, config, snap.frozen, journaled=set(snap.read))
        snap.rolled_back = True
        raise


def per_vm_run(
    what: str, kind: str, vm: str, config: str | None, backup_id: str | None,
    body: Callable[[backup.Session, str, Steps], T],
) -> T:
    """What every per-VM backup run does around its body (backup-vm, files-vm): the session, the hand-off
    to its host's queue when it runs elsewhere (flows/_handoff.py), the run's tags, its set id (stable
    across retries) and, when it fails, the artifact that says what failed and how to resume."""
    session = backup.open_session(vm, config)
    policy = policy_for_vm(session.config, vm)
    handed = handed_off(kind, vm, session.host.name, session.config, policy=policy.name if policy else None)
    if handed is not None:  # started on another queue (e.g. Run in the UI: fleet): ran on its host's
        return handed
    tag_this_run(vm_tags(kind, vm, session.host.name, policy.name if policy else None))
    backup_id = backup_id or run_backup_id()
    steps = Steps(session.config.retries)
    try:
        return body(session, backup_id, steps)
    except BaseException as exc:
        failure_artifact(what, vm, backup_id, steps, exc)
        raise


def failure_artifact(what: str, vm: str, backup_id: str, steps: Steps, exc: BaseException) -> None:
    """What failed, what was rolled back, how to resume: on the failed run's page in the UI."""
    from prefect.runtime import flow_run

    step = getattr(exc, "hotvm_step", None) or steps.failed or "before the first step"
    tag_this_run([f"step:{step}"])  # the failure notification names the step (hotvm/notifications.py)
    done = ", ".join(f"{t.step} {t.device}" if t.device else t.step for t in steps.timings) or "none"
    froze = any(t.step == "add_redo" for t in steps.timings) or step.startswith("add_redo")
    rolled_back = (
        "Rolled back: every overlay this run put on the VM was committed back (the VM runs on its own disks "
        "again) and this run's unused dirty bitmaps were dropped; the previous set's bitmaps stay."
        if froze
        else "Nothing to roll back: the run failed before it put an overlay on the VM."
    )
    run = f"prefect flow-run retry {flow_run.id}" if flow_run.id else f"hotvm {what} {vm} (resumes the set)"
    text = "\n".join(
        [
            f"# {what.capitalize()} of {vm} FAILED at `{step}`",
            "",
            f"Error: `{type(exc).__name__}: {exc}`",
            "",
            f"Set: `{backup_id}` (unfinished: restores never see it; prune removes it if never resumed)",
            "",
            f"Steps that completed: {done}",
            "",
            rolled_back,
            "",
            "Resume: fix the cause, then press **Retry** on this run (or `" + run + "`). The retry keeps "
            "the same set and does not read again the disks the target already holds.",
        ]
    )
    with contextlib.suppress(Exception):  # the run's failure must stay the error reported
        create_markdown_artifact(
            text, key=f"{what}-{artifact_key(vm)}-failed", description=f"{what} of {vm} failed"
        )
