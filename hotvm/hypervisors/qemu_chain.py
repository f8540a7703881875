"""Turn QEMU's block-layer reports into one image chain per disk, and classify the disk.

QEMU reports backends (query-block), nodes (query-named-block-nodes) and edges (x-debug-query-block-graph)
separately; only the graph tells which node backs which, and only node names are safe to pass to commands
(filenames can repeat, `json:` filenames appear for snapshot=on overlays). So everything goes by node name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from hotvm.hypervisors.base import OVERLAY_MARKER, DiskMode

# Nodes that sit in a chain without being an image: skipped while walking (commit/mirror insert their own).
FILTER_DRIVERS = {
    "throttle", "copy-on-read", "commit_top", "mirror_top", "preallocate", "compress",
    "copy-before-write", "snapshot-access", "blkdebug", "blkverify", "blklogwrites",
}  # fmt: skip
# Protocols that are a plain file (or block device) on this host: an overlay can be put beside them.
FILE_PROTOCOLS = {"file", "host_device"}
# snapshot=on: QEMU puts a qcow2 on an unlinked temporary file named vl.XXXXXX (get_tmp_filename()).
TEMP_SNAPSHOT_RE = re.compile(r"^vl\.[A-Za-z0-9]{6}$")


@dataclass
class Layer:
    """One image in a chain: its format node and the file (protocol node) below it."""

    node: str
    format: str
    filename: str
    protocol: str
    read_only: bool
    virtual_size: int

    @property
    def is_hotvm(self) -> bool:
        return OVERLAY_MARKER in os.path.basename(self.filename)

    @property
    def is_temp_snapshot(self) -> bool:
        return (
            self.protocol == "file"
            and bool(TEMP_SNAPSHOT_RE.match(os.path.basename(self.filename)))
            and not os.path.exists(self.filename)
        )


@dataclass
class Chain:
    """A disk as QEMU runs it: `layers` from the node the guest writes to down to the last backing file."""

    device: str
    qdev: str
    backend: str
    read_only: bool
    root_node: str = ""
    """The node attached to the device (what `block-commit device=` must name)."""
    layers: list[Layer] = field(default_factory=list)

    @property
    def hotvm_layers(self) -> list[Layer]:
        """hotvm overlays on top of the disk, topmost first (only a contiguous run from the top counts)."""
        out = []
        for layer in self.layers:
            if not layer.is_hotvm:
                break
            out.append(layer)
        return out

    @property
    def image_index(self) -> int:
        return len(self.hotvm_layers)

    @property
    def image(self) -> Layer | None:
        idx = self.image_index
        return self.layers[idx] if idx < len(self.layers) else None

    def mode(self) -> tuple[DiskMode, str]:
        """The disk mode and, when it is not backed up, why."""
        image = self.image
        if image is None:
            return DiskMode.NO_FILE, "no medium inserted"
        if self.read_only or (image.read_only and not self.hotvm_layers):
            return DiskMode.READ_ONLY, "the disk is read-only (readonly=on or a read-only device)"
        if image.is_temp_snapshot:
            return DiskMode.TEMPORARY, (
                f"snapshot=on: the guest writes to a temporary overlay ({image.filename}) "
                "that QEMU throws away"
            )
        if image.protocol not in FILE_PROTOCOLS:
            return DiskMode.NO_FILE, f"the image is not a local file (protocol '{image.protocol}')"
        return DiskMode.PERSISTENT, ""


def device_name(backend: dict) -> str:
    """Drive id for -drive disks, else the qdev id (/machine/peripheral/D/virtio-backend -> D)."""
    if backend.get("device"):
        return backend["device"]
    qdev = backend.get("qdev", "")
    m = re.match(r"^/machine/peripheral/([^/]+)(/.*)?$", qdev)
    if m:
        return m.group(1)
    return qdev or backend.get("inserted", {}).get("node-name", "")


def build_chains(backends: list[dict], nodes: list[dict], graph: dict) -> list[Chain]:
    """Walk the graph from each backend's root node down through 'backing' edges."""
    by_name = {n["node-name"]: n for n in nodes}
    gid_to_name = {n["id"]: n["name"] for n in graph["nodes"]}
    children: dict[str, dict[str, str]] = {}
    for edge in graph["edges"]:
        parent = gid_to_name.get(edge["parent"], "")
        children.setdefault(parent, {})[edge["name"]] = gid_to_name.get(edge["child"], "")

    def skip_filters(name: str | None) -> str | None:
        seen = set()
        while name and by_name.get(name, {}).get("drv") in FILTER_DRIVERS and name not in seen:
            seen.add(name)
            kids = children.get(name, {})
            name = (
                kids.get("backing")
                or kids.get("file")
                or kids.get("image")
                or next(iter(kids.values()), None)
            )
        return name

    def protocol_of(name: str) -> tuple[str, str]:
        """The (driver, filename) of the node that finally stores `name`'s data."""
        seen = set()
        current = name
        while current not in seen:
            seen.add(current)
            kids = {k: v for k, v in children.get(current, {}).items() if k != "backing"}
            nxt = kids.get("file") or kids.get("image") or next(iter(kids.values()), None)
            if not nxt:
                break
            current = nxt
        node = by_name.get(current, {})
        return node.get("drv", ""), node.get("file", "")

    chains = []
    for backend in backends:
        inserted = backend.get("inserted")
        chain = Chain(
            device=device_name(backend),
            qdev=backend.get("qdev", ""),
            backend=backend.get("device") or backend.get("qdev", ""),
            read_only=bool(inserted and inserted.get("ro")),
            root_node=inserted.get("node-name", "") if inserted else "",
        )
        name = skip_filters(inserted.get("node-name")) if inserted else None
        seen: set[str] = set()
        while name and name not in seen:
            seen.add(name)
            node = by_name.get(name, {})
            protocol, filename = protocol_of(name)
            # a protocol node attached directly to the device reads as raw
            fmt = "raw" if protocol == node.get("drv") else node.get("drv", "")
            chain.layers.append(
                Layer(
                    node=name,
                    format=fmt,
                    filename=filename,
                    protocol=protocol,
                    read_only=bool(node.get("ro")),
                    virtual_size=int(node.get("image", {}).get("virtual-size", 0)),
                )
            )
            name = skip_filters(children.get(name, {}).get("backing"))
        chains.append(chain)
    return chains
