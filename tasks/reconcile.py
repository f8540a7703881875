from __future__ import annotations

from prefect import get_run_logger, task

from hotvm import backup
from tasks._options import STEP


@task(name="reconcile", task_run_name="reconcile", **STEP)
def reconcile_vm(vm: str, config: str | None = None) -> list[str]:
    """Before anything else: commit overlays an earlier crashed run left on the VM."""
    actions = backup.reconcile(backup.open_session(vm, config))
    log = get_run_logger()
    for action in actions:
        log.warning("%s: %s (%s)", action.device, action.action, ", ".join(action.overlays))
    return [f"{a.device}: {a.action}" for a in actions]


@task(name="rollback", task_run_name="rollback", **{**STEP, "retries": 5})
def rollback_vm(vm: str, config: str | None = None) -> list[str]:
    """After a failure: never leave the VM running on an overlay."""
    return reconcile_vm.fn(vm, config)
