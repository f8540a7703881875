"""backup_host: every VM of a host, at most `max_concurrent_backups` at once (the seed's 2-4 per host).

The cap is a Prefect global concurrency limit taken inside backup_vm, so it also holds across separate
runs and deployments hitting the same host, not just inside this flow.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.backup_vm import backup_vm
from hotvm.errors import HotvmError
from hotvm.models import load_config


@task(name="backup_one_vm", task_run_name="backup[{vm}]", cache_policy=NO_CACHE)
def backup_one_vm(vm: str, target: str | None, config: str | None) -> dict:
    """Runs backup_vm as a subflow, so each VM's steps show (and can be retried) in the UI on their own."""
    try:
        return {"vm": vm, "ok": True, **backup_vm(vm=vm, target=target, config=config)}
    except Exception as exc:  # noqa: BLE001 - one VM's failure must not stop the others
        return {"vm": vm, "ok": False, "error": str(exc)}


@flow(name="backup-host", task_runner=ThreadPoolTaskRunner(max_workers=8))
def backup_host(
    host: str, target: str | None = None, config: str | None = None, vms: list[str] | None = None
) -> list[dict]:
    """Back up the VMs of `host` (all of them, or those named in `vms`)."""
    cfg = load_config(config)
    names = [vm.name for vm in cfg.find_host(host).vms if not vms or vm.name in vms]
    futures = [backup_one_vm.submit(name, target, config) for name in names]
    results = [f.result() for f in futures]
    create_table_artifact(
        [{k: r.get(k) for k in ("vm", "ok", "backup_id", "url", "error")} for r in results],
        key=f"backup-host-{''.join(c if c.isalnum() else '-' for c in host.lower())}",
        description=f"weekly image backup of host {host}",
    )
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        get_run_logger().error("backup of %s failed: %s", r["vm"], r["error"])
    if failed:
        raise HotvmError(
            f"{len(failed)} of {len(results)} VM backups on host {host} failed: "
            + ", ".join(r["vm"] for r in failed),
            "see each VM's flow run; rerun it to resume",
        )
    return results
