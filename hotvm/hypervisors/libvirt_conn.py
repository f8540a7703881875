"""Opening a libvirt connection and finding a domain, with errors that say what to do."""

from __future__ import annotations

import libvirt

from hotvm.errors import HypervisorUnreachable, UnknownVMError, VMNotRunning

# libvirt prints every error to stderr by default, also those hotvm handles: keep stderr for real problems.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def connect(uri: str) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorUnreachable(
            f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
            "start libvirtd (or virtqemud) on that host and check the URI; qemu:///system needs root or the "
            "libvirt group, qemu+ssh:// needs key-based ssh access to a user allowed to use libvirt",
        ) from None


def lookup(conn: libvirt.virConnect, name: str, uri: str) -> libvirt.virDomain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise HypervisorUnreachable(
                f"libvirt at {uri} failed to look up domain '{name}': {exc.get_error_message()}",
                "check that libvirtd is healthy (virsh -c URI list --all)",
            ) from None
        known = sorted(d.name() for d in conn.listAllDomains(0))
        raise UnknownVMError(
            f"libvirt at {uri} has no domain '{name}' (domains: {', '.join(known) or 'none'})",
            "use the domain name as `virsh list --all` shows it",
        ) from None


def require_running(dom: libvirt.virDomain, uri: str) -> None:
    if not dom.isActive():
        raise VMNotRunning(
            f"domain '{dom.name()}' on {uri} is not running",
            f"start it (virsh -c {uri} start {dom.name()}) or back it up when it runs",
        )


def is_local(uri: str) -> bool:
    """True when the hypervisor runs on this machine (its file paths are our file paths): no host in the
    URI and a local transport (qemu:///system, qemu+unix:///system). Any URI naming a host counts as
    remote, even one that happens to reach this machine."""
    scheme = uri.split(":", 1)[0]
    transport = scheme.split("+", 1)[1] if "+" in scheme else "unix"
    host = uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""
    return transport == "unix" and host == ""
