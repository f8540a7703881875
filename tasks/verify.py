"""Restore-test and recovery steps: thin Prefect tasks over hotvm.verify (no retries: a test that fails
must show as failed, not be retried into a pass)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hotvm import verify


@task(name="select_vms", task_run_name="select_vms", cache_policy=NO_CACHE)
def select_vms(config: str | None, target: str | None, sample: int | None) -> list[str]:
    return verify.vms_to_verify(config, target, sample)


@task(name="verify_set", task_run_name="verify {vm}", retries=0, cache_policy=NO_CACHE)
def verify_set(
    vm: str, target: str | None, backup_id: str | None, boot: bool, keep: bool, config: str | None
) -> dict:
    """Restore into a scratch dir (every chunk checked), optionally boot it; record the result."""
    result = verify.verify_set(config, vm, target, backup_id, boot=boot, keep=keep)
    log = get_run_logger()
    if result["verified"]:
        log.info(
            "restore test of %s %s passed: ready in %.1f s",
            vm,
            result["backup_id"],
            result["seconds_to_ready"],
        )
    else:
        log.error(
            "restore test of %s %s FAILED (set marked unverified): %s",
            vm,
            result["backup_id"],
            "; ".join(result["problems"]),
        )
    return result
