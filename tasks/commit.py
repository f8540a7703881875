from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import task_run

from hotvm import backup
from hotvm.hypervisors.base import CommitResult
from tasks._options import STEP


def _run_name() -> str:
    """`commit data level 1`, `commit data final`."""
    params = task_run.parameters
    level = params["level"]
    return f"commit {params['device']} {'level ' + str(level) if level != 'final' else 'final'}"


@task(name="commit", task_run_name=_run_name, **STEP)
def commit_disk(vm: str, device: str, level: int | str, config: str | None = None) -> CommitResult:
    """level 1: merge the first overlay with no freeze; 'final': active commit and pivot (short freeze)."""
    result = backup.commit(backup.open_session(vm, config), device, level)
    if result.stall_ms is not None:
        get_run_logger().info("final commit of %s: guest I/O held for %.1f ms", device, result.stall_ms)
    return result
