"""backup_vm: the seed's Code Listing 7.1 for one running VM, every step a retryable task.

    reconcile -> add_redo (all disks, one instant, + this backup's dirty bitmaps) -> per disk: export_disk
    (only the chunks the previous backup's bitmap marks dirty, when it can be trusted), add_redo, commit
    level 1, commit final -> backup_config -> transfer (manifest last) -> drop the superseded bitmaps

A failure at any point commits the overlays back (rollback) before the run ends; a rerun (Prefect UI
"Retry", `prefect flow-run retry`, or `hotvm backup --resume`) keeps the same backup id and skips the
disks the target already holds.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows._limits import backup_slot
from flows._rollback import roll_back
from hotvm import backup
from hotvm.formats.repository import new_backup_id
from hotvm.hypervisors.base import FrozenDisk
from hotvm.hypervisors.qemu_agent import check_quiesce_possible
from hotvm.locks import BackupRunning, vm_lock
from hotvm.models import Manifest, StepTiming, TaskRetries, utcnow
from hotvm.policies import policy_for_vm
from tasks.bitmaps import drop_bitmaps
from tasks.commit import commit_disk
from tasks.config import backup_config
from tasks.export import export_disk
from tasks.plan import plan_disks
from tasks.reconcile import reconcile_vm
from tasks.redo import add_redo
from tasks.transfer import transfer


def _rollback_hook(flow, run, state) -> None:  # noqa: ANN001 - Prefect hook signature
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


class _Steps:
    """Runs each step task with the configured retries; records its wall-clock time for the manifest."""

    def __init__(self, retries: TaskRetries) -> None:
        self.retries = retries
        self.timings: list[StepTiming] = []

    def run(self, name: str, device: str | None, fn: Task, *args: Any, **kwargs: Any) -> Any:
        step = fn.with_options(retries=self.retries.retries, retry_delay_seconds=self.retries.retry_delay_s)
        start = time.monotonic()
        try:
            result = step(*args, **kwargs)
        except BaseException as exc:
            # The per-VM report of backup_policy/backup_host names the step that failed.
            if getattr(exc, "hotvm_step", None) is None:
                with contextlib.suppress(AttributeError):
                    exc.hotvm_step = f"{name}[{device}]" if device else name
            raise
        self.timings.append(StepTiming(step=name, device=device, seconds=round(time.monotonic() - start, 4)))
        return result


@flow(name="backup-vm", on_crashed=[_rollback_hook], on_cancellation=[_rollback_hook])
def backup_vm(
    vm: str, target: str | None = None, config: str | None = None, backup_id: str | None = None
) -> dict:
    """Hot image backup of one running VM into a new (or the resumed) backup set."""
    log = get_run_logger()
    session = backup.open_session(vm, config)
    quiesce = quiesce_for(session)  # refused here, before anything touches the VM
    backup_id = backup_id or run_backup_id()
    steps = _Steps(session.config.retries)
    with backup_slot(
        session.host.name,
        session.host.max_concurrent_backups,
        vm,
        reconcile=lambda: steps.run("reconcile", None, reconcile_vm, vm, config),
    ) as reconciled:
        started = utcnow()
        warnings = [f"reconciled: {a}" for a in reconciled]
        plan = steps.run("plan", None, plan_disks, vm, target, backup_id, config)
        warnings += [f"skipped {s.device}: {s.reason}" for s in plan.skipped]
        if not plan.todo and not plan.done:
            # No backup set: an empty "complete" set would count toward retention and rotate a good one out.
            reason = "no disks to back up" + (
                f" ({'; '.join(f'{s.device}: {s.reason}' for s in plan.skipped)})" if plan.skipped else ""
            )
            log.warning("backup of %s skipped: %s", vm, reason)
            return skipped_summary(vm, reason, plan.skipped, steps.timings, warnings)
        records = {r.device: r for r in plan.done}
        frozen, exported = [], set()
        try:
            if plan.todo:
                frozen = steps.run(
                    "add_redo", None, add_redo, vm, [d.device for d in plan.todo], backup_id, config,
                    track_changes=True, quiesce=quiesce,
                )  # fmt: skip
                for disk in frozen:
                    baseline = plan.baselines.get(disk.device)
                    record = steps.run(
                        "export", disk.device, export_disk, vm, target, backup_id, disk, config, baseline
                    )
                    exported.add(disk.device)
                    if warning := backup.incremental_warning(record, baseline):
                        warnings.append(warning)
                    steps.run("add_redo", disk.device, add_redo, vm, [disk.device], backup_id, config)
                    steps.run("commit_level1", disk.device, commit_disk, vm, disk.device, 1, config)
                    final = steps.run(
                        "commit_final", disk.device, commit_disk, vm, disk.device, "final", config
                    )
                    records[disk.device] = record.model_copy(update={"pivot_stall_ms": final.stall_ms})
            archive = steps.run("backup_config", None, backup_config, vm, target, backup_id, config)
            if plan.done:
                warnings.append(
                    f"resumed {backup_id}: {', '.join(r.device for r in plan.done)} came from an "
                    "earlier attempt (each disk records its own frozen_at time)"
                )
            manifest = Manifest(
                backup_id=backup_id,
                vm=vm,
                host=session.host.name,
                driver=session.host.driver,
                started_at=started,
                completed_at=utcnow(),
                disks=list(records.values()),
                skipped_disks=plan.skipped,
                consistency=set_consistency(frozen, plan.done),
                config_archive=archive,
                boot_check=session.vm.boot_check,
                steps=steps.timings,
                warnings=warnings,
            )
            url = steps.run("transfer", None, transfer, vm, target, manifest, config)
        except BaseException:
            log.error("backup of %s failed: committing its overlays back before the run ends", vm)
            roll_back(vm, config, frozen, journaled=exported)
            raise
        # The set is complete: the previous backup's bitmaps are superseded by this one's.
        superseded = backup.superseded_bitmaps(plan.baselines, records)
        if superseded:
            try:
                drop_bitmaps(vm, superseded, config)
            except Exception as exc:  # noqa: BLE001 - the backup is complete; a stray bitmap only costs RAM
                log.warning("backup complete, but superseded bitmaps %s stay: %s", superseded, exc)
                manifest.warnings.append(f"superseded dirty bitmaps not removed: {exc}")
    summary = summarize(manifest.model_copy(update={"steps": steps.timings}), url)
    create_markdown_artifact(
        _summary_markdown(summary), key=f"backup-{_artifact_key(vm)}", description=f"hot backup of {vm}"
    )
    log.info("backup %s of %s complete: %s", backup_id, vm, url)
    return summary


def quiesce_for(session: backup.Session) -> bool:
    """The VM's policy says whether to quiesce; a QEMU VM without an agent socket is refused up front."""
    policy = policy_for_vm(session.config, session.vm.name)
    if policy is None or not policy.quiesce:
        return False
    check_quiesce_possible(session.host, session.vm, policy.name)
    return True


def set_consistency(frozen: list[FrozenDisk], resumed: list) -> str:
    """application only when every disk of the set was frozen in this run's one quiesced instant."""
    if frozen and not resumed and all(d.consistency == "application" for d in frozen):
        return "application"
    return "crash"


def summarize(manifest: Manifest, url: str) -> dict:
    stalls = [d.pivot_stall_ms for d in manifest.disks if d.pivot_stall_ms is not None]
    modes = {d.device: d.export_mode or "full" for d in manifest.disks}
    return {
        "backup_id": manifest.backup_id,
        "vm": manifest.vm,
        "url": url,
        "path": url,
        "disks": [
            {
                "device": d.device,
                "bytes": d.virtual_size,
                "bytes_read": d.bytes_read,
                "bytes_new": d.bytes_new,
                "bytes_reused": d.bytes_reused,
                "mode": d.export_mode or "full",
                "incremental_from": d.incremental_from,
                "bitmap": d.bitmap,
                "pivot_stall_ms": d.pivot_stall_ms,
            }
            for d in manifest.disks
        ],
        "skipped_disks": [s.model_dump() for s in manifest.skipped_disks],
        "steps": [
            {
                "name": s.step,
                "device": s.device,
                "seconds": s.seconds,
                "note": modes.get(s.device or "", "") if s.step == "export" else "",
            }
            for s in manifest.steps
        ],
        "pivot_stall_ms": max(stalls) if stalls else None,
        "consistency": manifest.consistency,
        "warnings": manifest.warnings,
    }


def skipped_summary(
    vm: str, reason: str, skipped: list, timings: list[StepTiming], warnings: list[str]
) -> dict:
    return {
        "backup_id": None,
        "vm": vm,
        "url": None,
        "path": None,
        "skipped": reason,
        "disks": [],
        "skipped_disks": [s.model_dump() for s in skipped],
        "steps": [{"name": t.step, "device": t.device, "seconds": t.seconds, "note": ""} for t in timings],
        "pivot_stall_ms": None,
        "warnings": warnings,
    }


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _summary_markdown(summary: dict) -> str:
    lines = [
        f"# Backup {summary['backup_id']} of {summary['vm']}",
        "",
        f"Set: `{summary['url']}`",
        "",
        f"Consistency: {summary.get('consistency', 'crash')}",
        "",
        "| step | disk | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['name']} | {s['device'] or ''} | {s['seconds']:.3f} | {s.get('note', '')} |"
        for s in summary["steps"]
    ]
    if summary["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines)
