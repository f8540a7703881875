"""Rewriting a backed-up .vmx for a copy registered elsewhere (restore --to-host, sync-config).

The .vmx is a flat `key = "value"` file; VMware treats keys case-insensitively. Only what a copy must change
is touched: its name, its disk and nvram file names, and (new_identity) its UUIDs and MAC addresses, so the
copy never clashes with the original on the network or in vCenter.
"""

from __future__ import annotations

import re

_LINE = re.compile(r'^\s*([^=#\s][^=]*?)\s*=\s*"(.*)"\s*$')
_NIC = re.compile(r"^(ethernet\d+)\.", re.IGNORECASE)
_IDENTITY_KEYS = {"uuid.bios", "uuid.location", "vc.uuid"}
_NIC_IDENTITY = {"generatedaddress", "generatedaddressoffset", "address"}


def parse(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in text.splitlines() if (m := _LINE.match(line))]


def render(entries: list[tuple[str, str]]) -> str:
    return "".join(f'{key} = "{value}"\n' for key, value in entries)


def rewrite(text: str, name: str, disk_files: dict[str, str], new_identity: bool) -> str:
    """The .vmx for `name` whose disks (by .vmx device, e.g. scsi0:0) are the given descriptor files."""
    out: list[tuple[str, str]] = []
    nics: set[str] = set()
    devices = {d.lower(): f for d, f in disk_files.items()}
    entries = parse(text)
    # disks the backup does not hold (skipped independent disks...) would point at files that are not there
    missing = {
        key.lower().rsplit(".", 1)[0]
        for key, value in entries
        if key.lower().endswith(".filename") and value.lower().endswith(".vmdk")
        and key.lower().rsplit(".", 1)[0] not in devices
    }  # fmt: skip
    for key, value in entries:
        low = key.lower()
        if low.split(".", 1)[0] in missing:
            continue
        nic = _NIC.match(key)
        if low in _IDENTITY_KEYS and new_identity:
            continue  # vSphere generates new ones (uuid.action = "create" below)
        if nic and new_identity and low.split(".", 1)[1] in _NIC_IDENTITY:
            nics.add(nic[1])
            continue
        if nic and new_identity and low.endswith(".addresstype"):
            nics.add(nic[1])
            continue
        if low in ("displayname", "nvram", "uuid.action", "extendedconfigfile", "sched.swap.derivedname"):
            continue
        if low.endswith(".filename") and low.rsplit(".", 1)[0] in devices:
            value = devices[low.rsplit(".", 1)[0]]
        out.append((key, value))
    out += [("displayName", name), ("nvram", f"{name}.nvram"),
            ("uuid.action", "create" if new_identity else "keep")]  # fmt: skip
    out += [(f"{nic}.addressType", "generated") for nic in sorted(nics)]
    return render(out)


def from_description(description: dict, name: str, disk_files: dict[str, str]) -> str:
    """A minimal .vmx when the backup holds none (a VM backed up from another driver)."""
    hw = str(description.get("hardware_version") or "vmx-13").removeprefix("vmx-")
    entries = [
        (".encoding", "UTF-8"), ("config.version", "8"), ("virtualHW.version", hw),
        ("guestOS", str(description.get("guest_id") or "other")),
        ("numvcpus", str(description.get("cpus") or 1)),
        ("memsize", str(int(description.get("memory_bytes") or 512 << 20) >> 20)),
        ("scsi0.present", "TRUE"), ("scsi0.virtualDev", "lsilogic"),
    ]  # fmt: skip
    for unit, (device, file) in enumerate(disk_files.items()):
        slot = device if re.fullmatch(r"scsi\d+:\d+", device) else f"scsi0:{unit}"
        entries += [(f"{slot}.present", "TRUE"), (f"{slot}.fileName", file)]
    return rewrite(render(entries), name, {}, new_identity=True)


def descriptor(flat_name: str, size: int) -> bytes:
    """A VMFS descriptor for a flat (raw) extent: what ESX needs beside the uploaded raw disk."""
    sectors = (size + 511) // 512
    return (
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\nparentCID=ffffffff\n'
        'createType="vmfs"\n\n# Extent description\n'
        f'RW {sectors} VMFS "{flat_name}"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{max(1, sectors // (255 * 63))}"\n'
        'ddb.geometry.heads = "255"\nddb.geometry.sectors = "63"\nddb.virtualHWVersion = "13"\n'
    ).encode()
