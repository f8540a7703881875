"""sync_config: keep a powered-off copy of each VM registered on its standby host (the seed's "VMX sync").

For one VM, or every VM with a standby_host: the latest complete backup's config (and, with_disks, its
disks) is registered on the standby through that host's driver. Reruns are idempotent (identical ->
unchanged, changed -> updated), so the daily deployment only does work when a VM's config changed. Every
VM is tried; the run fails afterwards, naming each VM that could not be synced.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._fleet import artifact_key
from flows._runs import fleet_run_name
from hotvm.errors import HotvmError, RunFailed
from hotvm.standby import standby_vms
from tasks.sync import sync_vm_config


@flow(name="sync-config", flow_run_name=fleet_run_name("sync-config", "vm"))
def sync_config(
    vm: str | None = None,
    standby: str | None = None,
    with_disks: bool = False,
    target: str | None = None,
    config: str | None = None,
    start: bool = False,
) -> list[dict]:
    """Register the latest backup of `vm` (default: every VM with a standby_host) on its standby host.

    Args:
        vm: Only this VM; empty: every VM with a standby_host.
        standby: The standby host for `vm` (overrides its standby_host).
        with_disks: Also restore the latest disks into the standby's vm_dir.
        target: The target's name in hotvm.yaml; empty: the default target.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        start: Start the VM on the standby (failover).
    """
    if vm is not None:
        pairs = [(vm, standby)]
    else:
        if standby is not None:
            raise HotvmError("--standby needs a VM", "pass the VM too, or set standby_host per VM")
        pairs = [(name, host) for name, host in standby_vms(config)]
    log = get_run_logger()
    results = []
    for name, host in pairs:
        state = sync_vm_config(name, host, with_disks, target, config, start, return_state=True)
        if state.is_completed():
            results.append({"ok": True, **state.result()})
            continue
        exc = state.result(raise_on_failure=False)
        log.error("VM %s: sync to %s failed: %s", name, host, exc)
        results.append({"ok": False, "vm": name, "host": host, "action": "failed", "error": str(exc)})
    create_table_artifact(
        [
            {k: r.get(k) for k in ("vm", "host", "name", "action", "backup_id", "location", "error")}
            for r in results
        ],
        key="sync-config-" + artifact_key(vm or "all"),
        description="config sync to standby hosts",
    )
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise RunFailed(
            f"{len(failed)} of {len(results)} standby sync(s) failed: "
            + "; ".join(f"{r['vm']}: {r['error']}" for r in failed),
            "fix the cause shown and rerun: VMs already in sync are left unchanged",
            results,
        )
    log.info("%d VM(s) in sync on their standby hosts", len(results))
    return results
