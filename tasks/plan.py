from __future__ import annotations

from prefect import get_run_logger, task

from hotvm import backup
from tasks._options import STEP


@task(name="plan_disks", task_run_name="plan", **STEP)
def plan_disks(vm: str, target: str | None, backup_id: str, config: str | None = None) -> backup.DiskPlan:
    """Detect disk modes (skip what cannot take an overlay) and what this set already holds (resume)."""
    plan = backup.plan_disks(backup.open_session(vm, config), target, backup_id)
    log = get_run_logger()
    for skipped in plan.skipped:
        log.warning("skipping disk %s (%s): %s", skipped.device, skipped.path, skipped.reason)
    for record in plan.done:
        log.info("disk %s already exported in %s: not read again", record.device, backup_id)
    return plan
