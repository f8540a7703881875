"""Hypervisor drivers behind one protocol (base.HypervisorDriver); `open_driver` picks one by host config."""

from __future__ import annotations

from hotvm.errors import ConfigError
from hotvm.hypervisors.base import HypervisorDriver
from hotvm.models import HostConfig, VMConfig


def open_driver(host: HostConfig, vm: VMConfig) -> HypervisorDriver:
    """The driver for `vm` on `host`; imported lazily so one driver's dependencies never break another."""
    if host.driver == "qemu":
        from hotvm.hypervisors.qemu import QemuDriver

        return QemuDriver(vm, host)
    raise ConfigError(f"host '{host.name}': unknown driver '{host.driver}'", "use driver: qemu")


__all__ = ["HypervisorDriver", "open_driver"]
