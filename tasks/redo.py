from __future__ import annotations

from prefect import task
from prefect.runtime import task_run

from hotvm import backup
from hotvm.hypervisors.base import FrozenDisk
from tasks._options import STEP


def _run_name() -> str:
    """`add_redo data+fs`: the disks that get an overlay in this one instant."""
    return "add_redo " + "+".join(task_run.parameters["devices"])


@task(name="add_redo", task_run_name=_run_name, **STEP)
def add_redo(
    vm: str,
    devices: list[str],
    backup_id: str,
    config: str | None = None,
    track_changes: bool = False,
    quiesce: bool = False,
) -> list[FrozenDisk]:
    """Put an overlay (the seed's REDO log) on each disk at one instant; the guest keeps running.

    track_changes: start this backup's dirty bitmap on each disk in the same QMP transaction.
    quiesce: freeze the guest's file systems (guest agent) around that instant only; always thawed."""
    session = backup.open_session(vm, config)
    return backup.add_redo(session, devices, backup_id, track_changes, quiesce=quiesce)
