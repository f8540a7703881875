from __future__ import annotations

from prefect import get_run_logger, task

from hotvm import backup
from tasks._options import STEP


@task(name="drop_bitmaps", task_run_name="drop_bitmaps", **STEP)
def drop_bitmaps(vm: str, names: dict[str, list[str]], config: str | None = None) -> list[str]:
    """Remove hotvm dirty bitmaps by name: the superseded one after a backup, a failed run's new one."""
    removed = backup.drop_bitmaps(backup.open_session(vm, config), names)
    for item in removed:
        get_run_logger().info("removed dirty bitmap %s", item)
    return removed
