"""backup_host: every VM of a host, at most `max_concurrent_backups` at once (the seed's 2-4 per host).

The cap is a Prefect global concurrency limit taken inside backup_vm, so it also holds across separate
runs and deployments hitting the same host, not just inside this flow. Runner and report: flows/_fleet.py.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._fleet import MAX_PARALLEL_VMS, publish, run_vms, unlisted_rows
from flows._runs import artifact_key, fleet_run_name
from hotvm.config_file import load_config
from hotvm.hypervisors.resolve import resolve_vms


@flow(
    name="backup-host",
    flow_run_name=fleet_run_name("backup-host", "host"),
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_VMS),
)
def backup_host(
    host: str, target: str | None = None, config: str | None = None, vms: list[str] | None = None
) -> list[dict]:
    """Back up the VMs of `host` (all of them, or those named in `vms`).

    Args:
        host: The hypervisor host's name in hotvm.yaml; its VMs run on its work queue.
        target: The target's name in hotvm.yaml; empty: the default one.
        config: Path of hotvm.yaml; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        vms: Only these VMs of the host; empty: every VM of the host.
    """
    cfg = load_config(config)
    resolved = resolve_vms(cfg, [cfg.find_host(host).name])
    pairs = [(host, vm.name) for vm in resolved.of_host(host) if not vms or vm.name in vms]
    results = run_vms(pairs, target, config) + unlisted_rows(resolved.failures)
    return publish(
        results, f"backup-host-{artifact_key(host)}", f"weekly image backup of host {host}", f"host {host}"
    )
