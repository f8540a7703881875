"""daily-files: file-level backup of running VMs from the same hot snapshot (seed Table 7.1/7.3).

    reconcile -> plan_files -> add_redo (all disks, one instant, + this set's dirty bitmaps) -> per disk:
    scan_files (every guest file system on the frozen base; a volume the previous set's bitmap shows
    unchanged is not walked; elsewhere only new or changed files are read and stored), add_redo, commit
    level 1, commit final -> finish_files (manifest last) -> drop the superseded bitmaps -> update_catalog

Same guarantees as backup_vm: the per-VM lock and host slot it shares with image backups, rollback on any
failure and in the crash/cancel hooks, reconcile first, and a rerun (same backup id) skips the volumes and
disks the target already journals. An unreadable file system is reported and skipped; the others still
back up. `daily_files` runs it for every VM whose policy has `files:`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows._fleet import MAX_PARALLEL_VMS, publish, run_vms, unlisted_rows
from flows._limits import backup_slot
from flows._retried import completed_hook
from flows._runs import artifact_key, fleet_run_name, nothing_configured, vm_run_name
from flows._snapshot import Snapshot, Steps, hot_snapshot, per_vm_run, rollback_hook
from hotvm import backup
from hotvm.config_file import load_config
from hotvm.files.backup import summary_rows
from hotvm.formats.manifest import utcnow
from hotvm.hypervisors.base import FrozenDisk
from hotvm.hypervisors.resolve import resolve_vms
from hotvm.policies import policy_for_vm, vms_for_policy
from tasks.bitmaps import drop_bitmaps
from tasks.files import finish_files, plan_files, scan_files, update_catalog
from tasks.reconcile import reconcile_vm


def files_target(session: backup.Session, target: str | None) -> str | None:
    """--target, else the VM's policy's files.target, else the default target."""
    if target:
        return target
    policy = policy_for_vm(session.config, session.vm.name)
    return policy.files.target if policy is not None and policy.files is not None else None


@flow(
    name="files-vm",
    flow_run_name=vm_run_name("files"),
    on_crashed=[rollback_hook],
    on_completion=[completed_hook],
    on_cancellation=[rollback_hook],
)
def files_vm(
    vm: str, target: str | None = None, config: str | None = None, backup_id: str | None = None
) -> dict:
    """File-level backup of one running VM into a new (or the resumed) file set.

    Args:
        vm: The VM's name in hotvm.yaml. Run it on the work queue named after the VM's host.
        target: The target's name in hotvm.yaml; empty: the VM policy's files target, else the default one.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        backup_id: Resume this unfinished file set; empty: this run's own id (a retry of this run resumes
            it).
    """
    return per_vm_run(
        "files", "files", vm, config, backup_id,
        lambda session, backup_id, steps: _files(
            session, files_target(session, target), config, backup_id, steps
        ),
    )  # fmt: skip


def _files(session: backup.Session, target: str | None, config: str | None, backup_id: str, steps: Steps):
    log = get_run_logger()
    vm = session.vm.name
    with backup_slot(
        session.host.name,
        session.host.max_concurrent_backups,
        vm,
        reconcile=lambda: steps.run("reconcile", None, reconcile_vm, vm, config),
    ) as reconciled:
        started = utcnow()
        warnings = [f"reconciled: {a}" for a in reconciled]
        plan = steps.run("plan", None, plan_files, vm, target, backup_id, config)
        warnings += [f"skipped {s.device}: {s.reason}" for s in plan.skipped]

        def scan(disk: FrozenDisk):  # noqa: ANN202 - the per-disk read step of the shared sequence
            return steps.run(
                "scan_files", disk.device, scan_files, vm, target, backup_id, disk, plan.previous, config,
                plan.bitmaps.get(disk.device),
            )  # fmt: skip

        def finish(snap: Snapshot):  # noqa: ANN202 - FileSetManifest
            if plan.done:
                warnings.append(
                    f"resumed {backup_id}: {', '.join(j.device for j in plan.done)} from an earlier attempt"
                )
            journals = [*plan.done, *snap.read.values()]
            manifest = steps.run(
                "finish", None, finish_files, vm, target, backup_id, plan, journals, started, steps.timings,
                warnings, config,
            )  # fmt: skip
            return manifest, journals

        _, (manifest, journals) = hot_snapshot(
            vm, config, backup_id, steps, [d.device for d in plan.todo], scan, finish
        )
        # complete: the previous set's bitmaps are superseded by this one's (only where this set has one)
        superseded = {
            j.device: [plan.bitmaps[j.device]]
            for j in journals
            if j.bitmap and plan.bitmaps.get(j.device) and plan.bitmaps[j.device] != j.bitmap
        }
        if superseded:
            try:
                drop_bitmaps(vm, superseded, config)
            except Exception as exc:  # noqa: BLE001 - the set is complete; a stray bitmap only costs RAM
                log.warning("file set complete, but superseded bitmaps %s stay: %s", superseded, exc)
    try:
        catalog = steps.run("update_catalog", None, update_catalog, vm, target, config)
    except Exception as exc:  # noqa: BLE001 - the set is complete; the catalog re-syncs on next use
        log.warning("file set %s complete, catalog not updated: %s", backup_id, exc)
        catalog = None
    result = summarize(manifest, catalog)
    create_markdown_artifact(
        _markdown(result), key=f"files-{artifact_key(vm)}", description=f"file backup of {vm}"
    )
    log.info("file backup %s of %s complete", backup_id, vm)
    return Completed(message=f"file backup {backup_id} complete", data=result)


def summarize(manifest, catalog: dict | None) -> dict:  # noqa: ANN001 - FileSetManifest
    rows = summary_rows(manifest)
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "backup_id": manifest.backup_id,
        "vm": manifest.vm,
        "kind": "files",
        "incremental_from": manifest.incremental_from,
        "volumes": rows,
        "files_seen": sum(r["files_seen"] for r in ok),
        "files_read": sum(r["files_read"] for r in ok),
        "files_stored": sum(r["files_stored"] for r in ok),
        "bytes_new": sum(r["bytes_new"] for r in ok),
        "bytes_unchanged": sum(r["bytes_unchanged"] for r in ok),
        "skipped_disks": [s.model_dump() for s in manifest.skipped_disks],
        "steps": [{"name": s.step, "device": s.device, "seconds": s.seconds} for s in manifest.steps],
        "warnings": manifest.warnings,
        "catalog": catalog,
    }


def _markdown(result: dict) -> str:
    lines = [
        f"# File backup {result['backup_id']} of {result['vm']}",
        "",
        f"Incremental from: {result['incremental_from'] or 'none (first file backup)'}",
        "",
        "| file system | type | files seen | files read | files stored | bytes new | bytes unchanged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["volumes"]:
        if r["status"] == "ok":
            lines.append(
                f"| {r['volume']} | {r['fstype']}{' (not walked)' if r.get('unchanged_volume') else ''} "
                f"| {r['files_seen']} | {r['files_read']} "
                f"| {r['files_stored']} | {r['bytes_new']} | {r['bytes_unchanged']} |"
            )
        else:
            lines.append(f"| {r['volume']} | skipped: {r['reason']} | | | | | |")
    if result["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines)


@flow(
    name="daily-files",
    flow_run_name=fleet_run_name("daily-files", "policy"),
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_VMS),
)
def daily_files(policy: str = "default", config: str | None = None, target: str | None = None) -> list[dict]:
    """File-level backup of every VM of `policy` (if the policy has `files:`), to its files target.

    Run from its deployment, each VM is its own `files-vm` run on its host's work queue (retry a failed
    VM there); run from the CLI, each VM is a subflow in this process.

    Args:
        policy: The policy in hotvm.yaml whose VMs are backed up (its files: section).
        config: Path of hotvm.yaml; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        target: The target's name in hotvm.yaml; empty: the policy's files target, else the default one.
    """
    cfg = load_config(config)
    chosen = cfg.find_policy(policy)
    if chosen.files is None:
        return nothing_configured("daily-files", f"a files: section to policy '{policy}' (policies:)")
    target = target or chosen.files.target
    resolved = resolve_vms(cfg)
    pairs = [(host.name, vm.name) for host, vm in vms_for_policy(cfg, chosen, resolved)]
    results = run_vms(pairs, target, config, kind="files", policy=policy) + unlisted_rows(resolved.failures)
    return publish(
        results, f"daily-files-{artifact_key(policy)}", f"file backup of policy {policy}", f"policy {policy}"
    )
