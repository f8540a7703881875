"""backup_policy: the weekly-image run ("backup all") over every VM a policy selects, across hosts.

Every VM is a backup_vm subflow; they run concurrently, and each host's global concurrency limit (taken
inside backup_vm) caps how many run at once on that host, across concurrently running deployments too.
Report per VM (Prefect table artifact, `hotvm backup --all`): success / skipped (why) / failed (at which
step). The run fails if any VM failed; the others still ran.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._fleet import MAX_PARALLEL_VMS, publish, run_vms, unlisted_rows
from flows._runs import artifact_key, fleet_run_name
from hotvm.config_file import load_config
from hotvm.hypervisors.resolve import resolve_vms
from hotvm.policies import claimed_elsewhere, vms_for_policy


@flow(
    name="backup-policy",
    flow_run_name=fleet_run_name("backup-policy", "policy"),
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_VMS),
)
def backup_policy(
    policy: str = "default", config: str | None = None, target: str | None = None
) -> list[dict]:
    """Image backup of every VM of `policy` to its image target (`target` overrides it).

    Run from its deployment (weekly-image), each VM is its own `backup-vm` run on its host's work queue
    (retry a failed VM there, or retry this run: only the VMs that did not complete run again).

    Args:
        policy: The policy in hotvm.yaml whose VMs are backed up (none defined: every VM).
        config: Path of hotvm.yaml; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        target: The target's name in hotvm.yaml; empty: the policy's image target, else the default one.
    """
    cfg = load_config(config)
    chosen = cfg.find_policy(policy)
    target = target or chosen.image.target
    resolved = resolve_vms(cfg)
    pairs = [(host.name, vm.name) for host, vm in vms_for_policy(cfg, chosen, resolved)]
    skipped = [
        {"host": host.name, "vm": vm.name, "reason": f"belongs to policy '{owner}' (first match wins)"}
        for host, vm, owner in claimed_elsewhere(cfg, chosen, resolved)
    ]
    results = run_vms(pairs, target, config, skipped, kind="image", policy=policy)
    results += unlisted_rows(resolved.failures)
    return publish(
        results,
        f"backup-policy-{artifact_key(policy)}",
        f"image backup of policy {policy}",
        f"policy {policy}",
    )
