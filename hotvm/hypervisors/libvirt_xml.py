"""Reading and rewriting libvirt domain XML: disks with their chains and modes, NICs, identity.

Plain ElementTree on purpose: everything hotvm needs is a handful of elements, and the same code reads the
live XML (with <backingStore> chains) and the inactive XML (without them).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from hotvm.hypervisors.base import OVERLAY_MARKER, DiskMode

# What libvirt renumbers by itself whenever a disk's chain changes (its chain indexes): left out when
# the live XML before and after a backup is compared. Everything else must be identical.
VOLATILE_ATTRS = {"index"}


@dataclass(frozen=True)
class Layer:
    path: str
    format: str
    index: str = ""
    """libvirt's chain index (live XML only): 'vda[3]' names this layer in block job calls."""


@dataclass(frozen=True)
class XmlDisk:
    target: str
    device: str
    """disk | cdrom | floppy | lun"""
    source_type: str
    """file | block | network | volume | ..."""
    layers: list[Layer]
    """Top first: what the guest writes to, then its backing files (live XML)."""
    bus: str
    readonly: bool
    shareable: bool
    transient: bool
    snapshot: str
    """The disk's snapshot= attribute ('' when unset)."""

    @property
    def hotvm_layers(self) -> list[Layer]:
        """hotvm overlays at the top of the chain, top first."""
        out = []
        for layer in self.layers:
            if OVERLAY_MARKER not in os.path.basename(layer.path):
                break
            out.append(layer)
        return out

    @property
    def image(self) -> Layer | None:
        """The disk as hotvm must preserve it: the first layer below hotvm's overlays."""
        rest = self.layers[len(self.hotvm_layers) :]
        return rest[0] if rest else None

    @property
    def user_backing(self) -> list[Layer]:
        """The user's own backing files (their external snapshots) below the image."""
        return self.layers[len(self.hotvm_layers) + 1 :]

    def mode(self) -> tuple[DiskMode, str]:
        """The seed's disk-mode check for libvirt, with the reason a disk is skipped."""
        if self.device in ("cdrom", "floppy"):
            return DiskMode.NO_FILE, f"{self.device} drive"
        if not self.layers or not self.layers[0].path:
            return DiskMode.NO_FILE, "no medium (empty source)"
        if self.source_type != "file":
            return DiskMode.NO_FILE, f"source type '{self.source_type}' is not a local image file"
        if self.readonly:
            return DiskMode.READ_ONLY, "attached <readonly/>"
        if self.shareable:
            return DiskMode.SHARED, "<shareable/> (used by several domains)"
        if self.transient:
            return DiskMode.TEMPORARY, "<transient/>: its writes are thrown away at shutdown"
        if self.snapshot == "no":
            return DiskMode.NO_SNAPSHOT, "snapshot='no' in the domain XML"
        return DiskMode.PERSISTENT, ""


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def _chain(elem: ET.Element) -> list[Layer]:
    """The source of a <disk> and its nested <backingStore> elements, top first."""
    layers = []
    source = elem.find("source")
    fmt_elem = elem.find("driver")
    fmt = fmt_elem.get("type", "") if fmt_elem is not None else ""
    while source is not None:
        path = source.get("file") or source.get("dev") or source.get("name") or ""
        # the top's index is on its <source>, a backing file's on its <backingStore>
        layers.append(Layer(path, fmt, source.get("index") or elem.get("index", "")))
        backing = elem.find("backingStore")
        if backing is None or backing.find("source") is None:
            break
        elem = backing
        source = backing.find("source")
        fmt_elem = backing.find("format")
        fmt = fmt_elem.get("type", "") if fmt_elem is not None else ""
    return layers


def disks(root: ET.Element) -> list[XmlDisk]:
    out = []
    for elem in root.findall("./devices/disk"):
        target = elem.find("target")
        if target is None:
            continue
        out.append(
            XmlDisk(
                target=target.get("dev", ""),
                device=elem.get("device", "disk"),
                source_type=elem.get("type", "file"),
                layers=_chain(elem),
                bus=target.get("bus", ""),
                readonly=elem.find("readonly") is not None,
                shareable=elem.find("shareable") is not None,
                transient=elem.find("transient") is not None,
                snapshot=elem.get("snapshot", ""),
            )
        )
    return out


def nics(root: ET.Element) -> list[dict]:
    out = []
    for elem in root.findall("./devices/interface"):
        mac, model, source = elem.find("mac"), elem.find("model"), elem.find("source")
        out.append(
            {
                "type": elem.get("type", ""),
                "mac": mac.get("address", "") if mac is not None else "",
                "model": model.get("type", "") if model is not None else "",
                "source": dict(source.attrib) if source is not None else {},
            }
        )
    return out


def nvram(root: ET.Element) -> str | None:
    elem = root.find("./os/nvram")
    return elem.text.strip() if elem is not None and elem.text else None


def without_hotvm_overlays(xml: str) -> str:
    """The XML as the user defined it: disks that run on hotvm overlays point at their image again.

    libvirt updates the persistent definition too when it takes a disk-only snapshot, so XML read
    mid-backup names the overlay; a backup must never keep that (a restore would look for the overlay)."""
    root = parse(xml)
    changed = False
    for elem in root.findall("./devices/disk"):
        source = elem.find("source")
        if source is None or OVERLAY_MARKER not in os.path.basename(source.get("file", "")):
            continue
        image = next(
            (layer for layer in _chain(elem) if OVERLAY_MARKER not in os.path.basename(layer.path)), None
        )
        if image is None:
            continue
        # the image's own backing chain is libvirt's to rediscover: drop ours, keep only the image
        for child in list(elem):
            if child.tag == "backingStore":
                elem.remove(child)
        source.set("file", image.path)
        source.attrib.pop("index", None)
        if image.format:
            driver = elem.find("driver")
            if driver is not None:
                driver.set("type", image.format)
        changed = True
    return ET.tostring(root, encoding="unicode") if changed else xml


def strip_volatile(xml: str) -> str:
    """The XML minus what libvirt changes by itself at runtime (ids, chain indexes): for comparisons."""
    root = parse(xml)
    for elem in root.iter():
        for attr in VOLATILE_ATTRS:
            elem.attrib.pop(attr, None)
    return ET.tostring(root, encoding="unicode")
