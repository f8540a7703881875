"""Which VMs a policy covers: pure functions over the configuration and the run's resolved VMs (no I/O:
the caller resolves them once, hotvm.hypervisors.resolve.resolve_vms).

A VM belongs to the first policy (in hotvm.yaml order) whose `vms:` names or fnmatch-globs it; a policy
therefore selects the VMs it matches that no earlier policy has claimed.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from hotvm.config import Config, HostConfig, Policy, VMConfig


def matches(policy: Policy, vm: str) -> bool:
    return any(fnmatchcase(vm, pattern) for pattern in policy.vms)


def policy_for_vm(config: Config, vm: str) -> Policy | None:
    """The first policy that matches the VM name (None: no policy covers it)."""
    return next((p for p in config.effective_policies() if matches(p, vm)), None)


def _policy(config: Config, policy: Policy | str) -> Policy:
    return config.find_policy(policy) if isinstance(policy, str) else policy


def vms_for_policy(
    config: Config, policy: Policy | str, vms: Iterable[tuple[HostConfig, VMConfig]]
) -> list[tuple[HostConfig, VMConfig]]:
    """(host, vm) of every VM of `vms` whose policy is `policy`, in their order."""
    policy = _policy(config, policy)
    return [
        (host, vm)
        for host, vm in vms
        if (owner := policy_for_vm(config, vm.name)) is not None and owner.name == policy.name
    ]


def claimed_elsewhere(
    config: Config, policy: Policy | str, vms: Iterable[tuple[HostConfig, VMConfig]]
) -> list[tuple[HostConfig, VMConfig, str]]:
    """VMs of `vms` that `policy` matches but an earlier policy claims: (host, vm, that policy's name)."""
    policy = _policy(config, policy)
    out = []
    for host, vm in vms:
        owner = policy_for_vm(config, vm.name)
        if matches(policy, vm.name) and owner is not None and owner.name != policy.name:
            out.append((host, vm, owner.name))
    return out
