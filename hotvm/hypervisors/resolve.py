"""The one place a run learns which VMs it has: listed VMs as configured, discovering hosts asked once.

The config (hotvm/config.py) is pure data; a libvirt or vSphere host with no `vms:` listed backs up every
VM it has, which only the host can say. `resolve_vms` asks each such host once per run, so a run never
connects to a hypervisor more than once just to find names, and a host that is down fails alone: its
failure is returned beside the VMs of every other host, with one line naming the host and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hotvm.config import DEFAULT_CONFIG, Config, HostConfig, VMConfig
from hotvm.errors import HotvmError, HypervisorUnreachable, UnknownVMError


@dataclass(frozen=True)
class HostFailure:
    """A discovering host whose VMs could not be listed this run."""

    host: str
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})"


@dataclass
class ResolvedVMs:
    """(host, vm) of every VM of the run in config order, and the hosts that could not be listed."""

    pairs: list[tuple[HostConfig, VMConfig]] = field(default_factory=list)
    failures: list[HostFailure] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[HostConfig, VMConfig]]:
        return iter(self.pairs)

    def of_host(self, host: str) -> list[VMConfig]:
        return [vm for h, vm in self.pairs if h.name == host]

    def find(self, name: str) -> tuple[HostConfig, VMConfig] | None:
        return next(((h, vm) for h, vm in self.pairs if vm.name == name), None)

    def failure_of(self, host: str) -> HostFailure | None:
        return next((f for f in self.failures if f.host == host), None)

    def require(self) -> ResolvedVMs:
        """Self when every host could be listed; else raise, naming each host that could not."""
        if self.failures:
            raise HypervisorUnreachable(
                "; ".join(f.message for f in self.failures), self.failures[0].hint
            )
        return self


def _discover(host: HostConfig) -> list[VMConfig]:
    from hotvm.hypervisors import discover_vms

    return [VMConfig(name=name) for name in discover_vms(host)]


def _failure(host: HostConfig, exc: Exception) -> HostFailure:
    where = host.uri or host.url or host.name
    detail = exc.message if isinstance(exc, HotvmError) else str(exc) or type(exc).__name__
    return HostFailure(
        host=host.name,
        message=f"host '{host.name}' ({host.driver} {where}): cannot list its VMs: {detail}",
        hint=f"start the hypervisor or fix hosts[{host.name}] in hotvm.yaml, then rerun",
    )


def resolve_vms(config: Config, hosts: Iterable[str] | None = None) -> ResolvedVMs:
    """The VMs of `hosts` (default: every host), each discovering host asked once; never raises for a
    host that is down: its failure is in `failures`, every other host's VMs are in `pairs`."""
    wanted = None if hosts is None else set(hosts)
    out = ResolvedVMs()
    for host in config.hosts:
        if wanted is not None and host.name not in wanted:
            continue
        if not host.discovers_vms:
            out.pairs.extend((host, vm) for vm in host.vms)
            continue
        try:
            out.pairs.extend((host, vm) for vm in _discover(host))
        except (HotvmError, OSError) as exc:
            out.failures.append(_failure(host, exc))
    return out


def host_vms(config: Config, host: str) -> list[VMConfig]:
    """The VMs of one host; raises (one line naming the host) when it is a discovering host that is down."""
    resolved = resolve_vms(config, [config.find_host(host).name])
    if resolved.failures:
        failure = resolved.failures[0]
        raise HypervisorUnreachable(failure.message, failure.hint)
    return resolved.of_host(host)


def find_vm(config: Config, name: str) -> tuple[HostConfig, VMConfig]:
    """The host and config of VM `name`: a listed VM without any connection, else the discovering hosts
    are asked (once each). Unknown: UnknownVMError naming what is configured and any host that is down."""
    listed = config.listed_vm(name)
    if listed is not None:
        return listed
    discovering = [h.name for h in config.hosts if h.discovers_vms]
    resolved = resolve_vms(config, discovering)
    found = resolved.find(name)
    if found is not None:
        return found
    known = ", ".join(vm.name for h in config.hosts for vm in h.vms) or "none"
    if discovering:
        known += " and every VM of " + ", ".join(discovering)
    down = "".join(f"; {f.message}" for f in resolved.failures)
    raise UnknownVMError(
        f"unknown VM '{name}' (configured: {known}){down}",
        f"add it under hosts[].vms in {config.source or DEFAULT_CONFIG}",
    )
