from __future__ import annotations

from prefect import task

from hotvm import backup
from hotvm.hypervisors.base import FrozenDisk
from tasks._options import STEP


@task(name="add_redo", task_run_name="add_redo[{devices}]", **STEP)
def add_redo(vm: str, devices: list[str], backup_id: str, config: str | None = None) -> list[FrozenDisk]:
    """Put an overlay (the seed's REDO log) on each disk at one instant; the guest keeps running."""
    return backup.add_redo(backup.open_session(vm, config), devices, backup_id)
