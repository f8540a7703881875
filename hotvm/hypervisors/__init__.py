"""Hypervisor drivers behind one protocol (base.HypervisorDriver); `open_driver` picks one by host config.

Each driver module is imported lazily, so one driver's library (libvirt-python, pyVmomi) missing or
broken never stops another driver from working.
"""

from __future__ import annotations

from hotvm.config import HostConfig, VMConfig
from hotvm.hypervisors.base import HostDriver, HypervisorDriver


def open_driver(host: HostConfig, vm: VMConfig) -> HypervisorDriver:
    """The driver for `vm` on `host`."""
    if host.driver == "libvirt":
        from hotvm.hypervisors.libvirt import LibvirtDriver

        return LibvirtDriver(vm, host)
    if host.driver == "vsphere":
        from hotvm.hypervisors.vsphere import VSphereDriver

        return VSphereDriver(vm, host)
    from hotvm.hypervisors.qemu import QemuDriver

    return QemuDriver(vm, host)


def open_host(host: HostConfig) -> HostDriver:
    """Host-wide operations (list VMs, register a VM) for `host`."""
    if host.driver == "libvirt":
        from hotvm.hypervisors.libvirt import LibvirtHost

        return LibvirtHost(host)
    if host.driver == "vsphere":
        from hotvm.hypervisors.vsphere import VSphereHost

        return VSphereHost(host)
    from hotvm.hypervisors.qemu_host import QemuHost

    return QemuHost(host)


def discover_vms(host: HostConfig) -> list[str]:
    """Every VM `host` has now (libvirt domains, vSphere VMs): used when hotvm.yaml lists none."""
    driver = open_host(host)
    try:
        return driver.list_vms()
    finally:
        driver.close()


__all__ = ["HostDriver", "HypervisorDriver", "discover_vms", "open_driver", "open_host"]
