"""Host-wide libvirt operations: every domain (the seed's registered_vm_names) and defining a restored or
standby copy of a backed-up domain (the seed's RegisterVM), idempotently."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from hotvm.child_env import child_env
from hotvm.config import HostConfig
from hotvm.errors import ConfigError, HypervisorError
from hotvm.hypervisors import libvirt_xml as lx
from hotvm.hypervisors.base import OVERLAY_MARKER, Capability, HostDriver, RegisterResult, VMDefinition
from hotvm.hypervisors.libvirt_conn import connect, is_local
from hotvm.safepath import component

log = logging.getLogger("hotvm.libvirt")


class LibvirtHost(HostDriver):
    """HostDriver for one libvirt URI."""

    name = "libvirt"
    capabilities = frozenset({Capability.REGISTER_VMS})

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.uri = host.uri or "qemu:///system"
        self._conn: libvirt.virConnect | None = None

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self._conn = connect(self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def list_vms(self) -> list[str]:
        return sorted(dom.name() for dom in self.conn.listAllDomains(0))

    def register_vm(self, definition: VMDefinition, start: bool = False) -> RegisterResult:
        """Define `definition.name` from the backed-up domain XML, pointing at the restored disks.

        An existing domain of that name keeps its UUID (and, for a copy, its MACs), so registering the same
        backup again changes nothing ("unchanged"); anything else in the XML is updated."""
        component(definition.name, "VM name")  # it names the copy's own files (_rename_files)
        source = definition.documents.get("domain.xml")
        if source is None:
            raise ConfigError(
                f"the backup of {definition.source_vm} has no domain.xml (made by the "
                f"{definition.source_driver} driver)",
                "register it on a host of its own driver, or define the domain by hand",
            )
        existing = self._existing(definition.name)
        root = self._build(definition, source.decode(), existing)
        xml = ET.tostring(root, encoding="unicode")
        before = existing.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if existing is not None else None
        if existing is not None and existing.isActive() and _sources(lx.parse(before)) != _sources(root):
            raise HypervisorError(
                f"domain '{definition.name}' runs on {self.uri}: registering the restored copy under its "
                "name would point it at other disks",
                "restore under a new name (--name), or shut the domain down first",
            )
        try:
            dom = self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"libvirt at {self.uri} refused to define domain '{definition.name}': "
                f"{exc.get_error_message()}",
                "check the restored disk paths and the devices the XML needs on this host",
            ) from None
        after = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        action = "created" if before is None else ("unchanged" if before == after else "updated")
        started = False
        if start and not dom.isActive():
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise HypervisorError(
                    f"domain '{definition.name}' was {action} on {self.uri} but does not start: "
                    f"{exc.get_error_message()}",
                    "check that libvirt's qemu user can read the restored disks (directory permissions) and "
                    "that no other running domain uses the same image files",
                ) from None
            started = True
        log.info("domain '%s' %s on %s%s", definition.name, action, self.uri, ", started" if started else "")
        return RegisterResult(
            host=self.host.name, name=definition.name, action=action, started=started,
            location=f"{self.uri} domain {definition.name} ({dom.UUIDString()})",
        )  # fmt: skip

    def _existing(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _build(self, definition: VMDefinition, source: str, existing: libvirt.virDomain | None) -> ET.Element:
        root = lx.parse(source)
        old_name = root.findtext("name", "")
        _set_text(root, "name", definition.name)
        uuid = root.find("uuid")
        if existing is not None:
            if uuid is None:
                uuid = ET.SubElement(root, "uuid")
            uuid.text = existing.UUIDString()  # libvirt keys a name to one UUID
        elif definition.new_identity and uuid is not None:
            root.remove(uuid)  # libvirt generates a new one
        if definition.new_identity:
            old_macs = [n["mac"] for n in lx.nics(lx.parse(existing.XMLDesc(0)))] if existing else []
            _new_macs(root, old_macs)
            _rename_files(root, old_name, definition.name)
        self._point_disks(root, definition)
        return root

    def _point_disks(self, root: ET.Element, definition: VMDefinition) -> None:
        devices = root.find("devices")
        for elem in list(devices.findall("disk") if devices is not None else []):
            target = elem.find("target")
            dev = target.get("dev", "") if target is not None else ""
            restored = definition.disks.get(dev)
            source = elem.find("source")
            if restored is not None:
                for child in [c for c in elem if c.tag in ("source", "backingStore")]:
                    elem.remove(child)
                elem.set("type", "file")
                new_source = ET.Element("source", {"file": str(restored)})
                driver = elem.find("driver")
                elem.insert(list(elem).index(driver) + 1 if driver is not None else 0, new_source)
                fmt = self._format(restored)
                if fmt:
                    if driver is None:
                        driver = ET.Element("driver", {"name": "qemu"})
                        elem.insert(0, driver)
                    driver.set("type", fmt)
                continue
            path = source.get("file", "") if source is not None else ""
            if OVERLAY_MARKER in os.path.basename(path):
                raise HypervisorError(
                    f"disk {dev} of {definition.source_vm} names hotvm overlay {path} and was not restored",
                    "restore that disk too, or remove it from the domain XML",
                )
            # transient disks too: libvirt 9.0 opens their image writable before adding the throw-away overlay
            writable = elem.find("readonly") is None and elem.find("shareable") is None
            if definition.new_identity and path and writable and elem.get("device", "disk") == "disk":
                # the copy must never write into the original's disk
                log.warning(
                    "domain '%s': disk %s (%s) was not restored; left out", definition.name, dev, path
                )
                devices.remove(elem)

    def _format(self, image: Path) -> str:
        """The restored image's real format (a restore may write raw or qcow2), when it is on this machine."""
        if not is_local(self.uri):
            return ""
        # -U: a copy registered before may be running on it (a re-register must still work)
        proc = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(image)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
        )
        if proc.returncode != 0:
            raise HypervisorError(
                f"restored disk {image} is not readable: {proc.stderr.strip()}",
                "restore the disk again, or pass the path of an existing image",
            )
        return str(json.loads(proc.stdout)["format"])


def _sources(root: ET.Element) -> dict[str, str]:
    """target dev -> image file of every disk in a domain XML."""
    return {d.target: d.layers[0].path if d.layers else "" for d in lx.disks(root)}


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    elem = root.find(tag)
    if elem is None:
        elem = ET.SubElement(root, tag)
    elem.text = text


def _new_macs(root: ET.Element, keep: list[str]) -> None:
    """A copy gets its own MAC addresses (the existing copy's again, so a re-register changes nothing)."""
    for i, iface in enumerate(root.findall("./devices/interface")):
        mac = iface.find("mac")
        if mac is None:
            mac = ET.Element("mac")
            iface.insert(0, mac)
        mac.set("address", keep[i] if i < len(keep) else _random_mac())


def _random_mac() -> str:
    return "52:54:00:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))  # noqa: S311


def _rename_files(root: ET.Element, old: str, new: str) -> None:
    """Per-domain files (serial/console logs, nvram) of a copy must not be the original's."""
    for elem in root.findall("./devices/serial/source") + root.findall("./devices/console/source"):
        path = elem.get("path")
        if path:
            elem.set("path", _renamed(path, old, new))
    log_elem = root.findall("./devices/serial/log") + root.findall("./devices/console/log")
    for elem in log_elem:
        if elem.get("file"):
            elem.set("file", _renamed(elem.get("file", ""), old, new))
    nvram = root.find("./os/nvram")
    if nvram is not None and nvram.text:
        nvram.text = _renamed(nvram.text.strip(), old, new)


def _renamed(path: str, old: str, new: str) -> str:
    p = Path(path)
    if old and old in p.name:
        return str(p.with_name(p.name.replace(old, new)))
    return f"{path}.{new}"
