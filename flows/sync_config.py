"""sync_config: keep a powered-off copy of each VM registered on its standby host (the seed's "VMX sync").

For one VM, or every VM with a standby_host: the latest complete backup's config (and, with_disks, its
disks) is registered on the standby through that host's driver. Reruns are idempotent (identical ->
unchanged, changed -> updated), so the daily deployment only does work when a VM's config changed. Every
VM is tried; the run fails afterwards, naming each VM that could not be synced.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment
from prefect.states import Completed

from flows._fleet import fan_out, publish
from flows._handoff import handed_off
from flows._retried import completed_hook
from flows._runs import (
    FLEET_QUEUE,
    artifact_key,
    fleet_run_name,
    nothing_configured,
    tag_this_run,
    vm_run_name,
    vm_tags,
)
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
        if not pairs and deployment.id:
            return nothing_configured("sync-config", "standby_host: HOST to a VM (under hosts: ... vms:)")
    if deployment.id and vm is None:  # from the UI: one sync-vm run per VM on its standby host's worker
        params = {"with_disks": with_disks, "target": target, "config": config, "start": start}
        rows = fan_out([n for n, _ in pairs], "standby", params, config, hosts=dict(pairs))
        key = "sync-config-" + artifact_key("all")
        return publish(rows, key, "config sync to standby hosts", "the standby VMs", "sync", "standby syncs")
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


@flow(name="sync-vm", flow_run_name=vm_run_name("sync"), on_completion=[completed_hook])
def sync_vm(
    vm: str,
    standby: str | None = None,
    with_disks: bool = False,
    target: str | None = None,
    config: str | None = None,
    start: bool = False,
):  # noqa: ANN201 - a Completed state carrying the result
    """Register the latest backup of `vm` on its standby host; sync-config starts one per VM.

    Args:
        vm: The VM whose latest backup is registered on its standby host.
        standby: The standby host (overrides the VM's standby_host); run on that host's work queue.
        with_disks: Also restore the latest disks into the standby's vm_dir.
        target: The target's name in hotvm.yaml; empty: the default target.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        start: Start the VM on the standby (failover).
    """
    host = standby or dict(standby_vms(config)).get(vm)
    if (handed := handed_off("standby", vm, host, config)) is not None:
        return handed  # started on fleet from the UI: registered by the standby host's worker
    host = host or FLEET_QUEUE
    tag_this_run(vm_tags("standby", vm, host))
    try:
        result = sync_vm_config(vm, standby, with_disks, target, config, start)
    except BaseException:
        tag_this_run(["step:sync_config"])
        raise
    message = f"standby on {result['host']} {result['action']} from backup {result['backup_id']}"
    return Completed(message=message, data=result)
