"""Retry behaviour shared by every step: retry what may pass next time, never what cannot."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from hotvm.errors import BackupSetError, ConfigError, DiskNotSupported, TargetFull, VMNotRunning

PERMANENT_ERRORS = (ConfigError, DiskNotSupported, TargetFull, BackupSetError, VMNotRunning)


def retry_unless_permanent(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    """A wrong config, a full target, a stopped VM or a disk that cannot take an overlay: the same again."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (socket, network, busy node)
        return True
    return True


STEP = dict(
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,  # state lives in the hypervisor and the target: each run re-reads it
)
