"""backup_vm: the seed's Code Listing 7.1 for one running VM, every step a retryable task.

    reconcile -> add_redo (all disks, one instant, + this backup's dirty bitmaps) -> per disk: export
    (only the chunks the previous backup's bitmap marks dirty, when it can be trusted), add_redo, commit
    level 1, commit final -> backup_config -> transfer (manifest last) -> drop the superseded bitmaps

The snapshot part is flows/_snapshot.hot_snapshot, shared with the file-level backup (files-vm).

A failure at any point commits the overlays back (rollback) before the run ends; a rerun (Prefect UI
"Retry", `prefect flow-run retry`, or `hotvm backup --resume`) keeps the same backup id and skips the
disks the target already holds.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows._limits import backup_slot
from flows._retried import completed_hook
from flows._runs import artifact_key, vm_run_name
from flows._snapshot import Snapshot, Steps, hot_snapshot, per_vm_run, rollback_hook
from hotvm import backup
from hotvm.formats.manifest import Manifest, StepTiming, utcnow
from hotvm.hypervisors.base import FrozenDisk
from hotvm.hypervisors.qemu_agent import check_quiesce_possible
from hotvm.policies import policy_for_vm
from tasks.bitmaps import drop_bitmaps
from tasks.config import backup_config
from tasks.export import export_disk
from tasks.plan import plan_disks
from tasks.reconcile import reconcile_vm
from tasks.transfer import transfer

CRASH_CONSISTENT = (
    "crash-consistent: every disk holds what it held at one instant, as after a power cut at that instant "
    "(the guest was not asked to flush; journaling file systems and databases recover as after a reboot)"
)


@flow(
    name="backup-vm",
    flow_run_name=vm_run_name("backup"),
    on_crashed=[rollback_hook],
    on_completion=[completed_hook],
    on_cancellation=[rollback_hook],
)
def backup_vm(
    vm: str, target: str | None = None, config: str | None = None, backup_id: str | None = None
) -> dict:
    """Hot image backup of one running VM into a new (or the resumed) backup set.

    Args:
        vm: The VM's name in hotvm.yaml. Run it on the work queue named after the VM's host.
        target: The target's name in hotvm.yaml; empty: the VM policy's image target, else the default one.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        backup_id: Resume this unfinished backup set; empty: this run's own id (a retry of this run
            resumes it).
    """
    return per_vm_run(
        "backup", "image", vm, config, backup_id,
        lambda session, backup_id, steps: _backup(session, target, config, backup_id, steps),
    )  # fmt: skip


def _backup(session: backup.Session, target: str | None, config: str | None, backup_id: str, steps: Steps):
    log = get_run_logger()
    vm = session.vm.name
    quiesce = quiesce_for(session)  # refused here, before anything touches the VM
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
            summary = skipped_summary(vm, reason, plan.skipped, steps.timings, warnings)
            return Completed(message=f"skipped: {reason}", data=summary)
        records = {r.device: r for r in plan.done}

        def export(disk: FrozenDisk):  # noqa: ANN202 - the per-disk read step of the shared sequence
            baseline = plan.baselines.get(disk.device)
            record = steps.run(
                "export", disk.device, export_disk, vm, target, backup_id, disk, config, baseline
            )
            if warning := backup.incremental_warning(record, baseline):
                warnings.append(warning)
            return record

        def finish(snap: Snapshot) -> tuple[Manifest, str]:
            for device, record in snap.read.items():
                records[device] = record.model_copy(update={"pivot_stall_ms": snap.stall_ms.get(device)})
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
                consistency=set_consistency(snap.frozen, plan.done),
                config_archive=archive,
                boot_check=session.vm.boot_check,
                steps=steps.timings,
                warnings=warnings,
            )
            return manifest, steps.run("transfer", None, transfer, vm, target, manifest, config)

        _, (manifest, url) = hot_snapshot(
            vm, config, backup_id, steps, [d.device for d in plan.todo], export, finish, quiesce=quiesce
        )
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
        _summary_markdown(summary), key=f"backup-{artifact_key(vm)}", description=f"hot backup of {vm}"
    )
    log.info("backup %s of %s complete: %s", backup_id, vm, url)
    return Completed(message=f"backup {backup_id} complete: {url}", data=summary)


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


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 1048576:.1f} MiB"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _summary_markdown(summary: dict) -> str:
    stall = summary.get("pivot_stall_ms")
    consistency = summary.get("consistency", "crash")
    lines = [
        f"# Backup {summary['backup_id']} of {summary['vm']}",
        "",
        f"Set: `{summary['url']}`",
        "",
        "Consistency: "
        + (
            "application-consistent (the guest agent froze the file systems at the snapshot instant)"
            if consistency == "application"
            else CRASH_CONSISTENT
        ),
        "",
        "Final-commit stall (guest I/O held while the VM pivots back to its disk): "
        + (f"{stall:.1f} ms" if stall is not None else "n/a"),
        "",
        "| disk | size | mode | read | new | reused | stall ms |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {d['device']} | {_mib(d['bytes'])} | {d['mode']} | {_mib(d['bytes_read'])} "
        f"| {_mib(d['bytes_new'])} | {_mib(d['bytes_reused'])} | {_ms(d['pivot_stall_ms'])} |"
        for d in summary["disks"]
    ]
    lines += [
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
