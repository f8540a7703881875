"""Inventory of every VM of every host (seed: "VMX File Backups" list, step 1 of the recovery plan).

    collect(config) -> Inventory          what each hypervisor reports now (an unreachable VM keeps its row)
    diff(old, new) -> InventoryDiff       pure: added / removed VMs, changed hardware, VMs without a policy
    render(inventory, fmt) -> bytes       csv | xlsx | md | json
    store(repo, inventory)                versioned as inventory/<timestamp>.json on a target

Plain Python: the CLI calls it directly, the inventory flow wraps it in tasks.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from hotvm import __version__
from hotvm.config import Config, HostConfig, VMConfig
from hotvm.errors import HotvmError
from hotvm.formats.manifest import utcnow

if TYPE_CHECKING:
    from hotvm.formats.repository import Repository

log = logging.getLogger("hotvm.inventory")

FORMATS = ("csv", "xlsx", "md", "json")
Format = Literal["csv", "xlsx", "md", "json"]
INVENTORY_DIR = "inventory"


class DiskEntry(BaseModel):
    device: str
    bus: str = ""
    path: str = ""
    format: str = ""
    virtual_size: int = 0
    allocated_bytes: int | None = None
    """Bytes the image chain occupies on the host (QEMU's actual-size summed over the layers)."""
    mode: str = ""
    backing_chain: list[str] = []


class NicEntry(BaseModel):
    id: str = ""
    model: str = ""
    mac: str = ""
    netdev: str = ""


class CdromEntry(BaseModel):
    device: str
    path: str | None = None
    format: str | None = None


class VMEntry(BaseModel):
    name: str
    host: str
    driver: str
    config_files: list[str] = []
    qmp: str | None = None
    status: str | None = None
    qemu_version: str | None = None
    cpus: int | None = None
    memory_bytes: int | None = None
    disks: list[DiskEntry] = []
    nics: list[NicEntry] = []
    cdroms: list[CdromEntry] = []
    startup_order: int | None = None
    cpu_limit: float | None = None
    """CPUs the host lets the VM use (cgroup cpu.max quota / period); None: unlimited or unknown."""
    cpu_weight: int | None = None
    """Relative CPU share (cgroup cpu.weight); None: unknown."""
    memory_limit_bytes: int | None = None
    """cgroup memory.max of the VM's process; None: unlimited or unknown."""
    os: str | None = None
    """Guest OS, when a guest agent or a file-level catalog tells (none does yet: None)."""
    external_data: list[str] = []
    policy: str | None = None
    error: str | None = None
    """Why the VM could not be read (it stays listed with what hotvm.yaml says about it)."""


class Inventory(BaseModel):
    collected_at: dt.datetime
    tool_version: str = __version__
    vms: list[VMEntry] = []

    def vm(self, name: str) -> VMEntry:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


class Change(BaseModel):
    vm: str
    field: str
    old: str
    new: str


class InventoryDiff(BaseModel):
    added: list[str] = []
    removed: list[str] = []
    changed: list[Change] = []
    warnings: list[str] = []

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.warnings)


# --------------------------------------------------------------------------- collecting


def collect(config: Config) -> Inventory:
    """One entry per configured VM, read from its hypervisor now; errors are recorded, never raised (a host
    whose VMs cannot be listed keeps one row, named after it, with the error)."""
    from hotvm.hypervisors.resolve import resolve_vms
    from hotvm.policies import policy_for_vm

    resolved = resolve_vms(config)
    entries = []
    for host, vm in resolved:
        entry = _vm_entry(host, vm)
        policy = policy_for_vm(config, vm.name)
        entry.policy = policy.name if policy is not None else None
        entries.append(entry)
    for failure in resolved.failures:
        host = config.find_host(failure.host)
        entries.append(VMEntry(name=f"(VMs of {host.name})", host=host.name, driver=host.driver,
                               error=str(failure)))  # fmt: skip
    return Inventory(collected_at=utcnow(), vms=entries)


def _vm_entry(host: HostConfig, vm: VMConfig) -> VMEntry:
    entry = VMEntry(
        name=vm.name,
        host=host.name,
        driver=host.driver,
        config_files=[str(p) for p in vm.config_files],
        qmp=str(vm.qmp) if vm.qmp else None,
        startup_order=vm.startup_order,
        external_data=list(vm.external_data),
    )
    from hotvm.hypervisors import open_driver

    try:
        driver = open_driver(host, vm)
        try:
            description = driver.describe_vm()
            hardware = driver.hardware()  # {} from a driver without Capability.HARDWARE
        finally:
            driver.close()
    except HotvmError as exc:
        entry.error = exc.message
        log.info("inventory: VM %r on host %r unreachable: %s", vm.name, host.name, exc.message)
        return entry
    allocated = hardware.get("allocated", {})
    entry.status = description.get("status")
    entry.qemu_version = description.get("qemu_version")
    entry.cpus = description.get("cpus")
    entry.memory_bytes = description.get("memory_bytes")
    cd_devices = {cd["device"] for cd in hardware.get("cdroms", [])}
    entry.disks = [
        DiskEntry(
            device=d["device"], bus=d.get("bus", ""), path=d.get("path", ""), format=d.get("format", ""),
            virtual_size=d.get("virtual_size", 0), allocated_bytes=allocated.get(d["device"]),
            mode=d.get("mode", ""), backing_chain=list(d.get("backing_chain", [])),
        )  # fmt: skip
        for d in description.get("disks", [])
        if d["device"] not in cd_devices
    ]
    entry.nics = [NicEntry(**n) for n in hardware.get("nics", [])]
    entry.cdroms = [
        CdromEntry(device=c["device"], path=c.get("path"), format=c.get("format"))
        for c in hardware.get("cdroms", [])
    ]
    pid = _qemu_pid(vm.qmp) if vm.qmp else None
    if pid is not None:
        entry.cpu_limit, entry.cpu_weight, entry.memory_limit_bytes = _cgroup_limits(pid)
    return entry


def _qemu_pid(qmp: Path) -> int | None:
    """The local QEMU process whose command line names this QMP socket (None if not found here)."""
    needle = str(qmp).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" in cmdline and any(
            arg.startswith((b"unix:" + needle, b"path=" + needle)) or b"unix:" + needle + b"," in arg
            for arg in cmdline.split(b"\0")
        ):
            return int(proc.name)
    return None


def _cgroup_limits(pid: int) -> tuple[float | None, int | None, int | None]:
    """(CPUs allowed, cpu.weight, memory.max) of the process's cgroup v2; None where unlimited/unknown."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
    except (OSError, StopIteration):
        return None, None, None
    base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")

    def read(name: str) -> str | None:
        try:
            return (base / name).read_text().strip()
        except OSError:
            return None

    cpu_limit = weight = memory = None
    if (cpu_max := read("cpu.max")) and not cpu_max.startswith("max"):
        quota, _, period = cpu_max.partition(" ")
        cpu_limit = round(int(quota) / int(period or 100000), 3)
    if (text := read("cpu.weight")) and text.isdigit():
        weight = int(text)
    if (text := read("memory.max")) and text.isdigit():
        memory = int(text)
    return cpu_limit, weight, memory


# --------------------------------------------------------------------------- diff


def _hardware(vm: VMEntry) -> dict[str, str]:
    return {
        "cpus": str(vm.cpus),
        "memory_bytes": str(vm.memory_bytes),
        "disks": "; ".join(
            f"{d.device} {d.bus} {d.format} {d.virtual_size} {d.path}" for d in sorted(vm.disks, key=_dev)
        ),
        "nics": "; ".join(f"{n.model} {n.mac}" for n in sorted(vm.nics, key=lambda n: n.mac)),
        "cdroms": "; ".join(c.device for c in sorted(vm.cdroms, key=_dev)),
    }


def _dev(x: DiskEntry | CdromEntry) -> str:
    return x.device


def diff(old: Inventory | None, new: Inventory) -> InventoryDiff:
    """Pure: what changed between two inventories. VMs that were unreachable in either are not compared
    (an unreachable VM is not a hardware change); a VM without a policy is a warning."""
    before = {vm.name: vm for vm in old.vms} if old else {}
    after = {vm.name: vm for vm in new.vms}
    result = InventoryDiff(
        added=sorted(set(after) - set(before)) if old else [],
        removed=sorted(set(before) - set(after)),
    )
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        if a.error or b.error:
            continue
        ha, hb = _hardware(a), _hardware(b)
        result.changed += [Change(vm=name, field=k, old=ha[k], new=hb[k]) for k in ha if ha[k] != hb[k]]
    for vm in new.vms:
        if vm.policy is None:
            what = "new VM" if vm.name in result.added else "VM"
            result.warnings.append(f"{what} '{vm.name}' on host '{vm.host}' is covered by no policy")
        if vm.error:
            result.warnings.append(f"VM '{vm.name}' on host '{vm.host}' could not be read: {vm.error}")
    return result


def diff_markdown(d: InventoryDiff, previous: str | None) -> str:
    lines = [f"# Inventory changes since {previous or 'nothing (first inventory)'}", ""]
    if d.empty:
        return "\n".join(lines + ["No changes."]) + "\n"
    for w in d.warnings:
        lines.append(f"- **warning:** {_md(w)}")
    if d.added:
        lines.append(f"- added: {', '.join(d.added)}")
    if d.removed:
        lines.append(f"- removed: {', '.join(d.removed)}")
    if d.changed:
        lines += ["", "| vm | what | before | now |", "|---|---|---|---|"]
        lines += [f"| {_md(c.vm)} | {c.field} | {_md(c.old)} | {_md(c.new)} |" for c in d.changed]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- rendering

VM_COLUMNS = [
    "host", "vm", "driver", "status", "qemu_version", "cpus", "memory_mb", "disks", "nics", "cdroms",
    "startup_order", "cpu_limit", "cpu_weight", "memory_limit_mb", "os", "policy", "config_files",
    "external_data", "error",
]  # fmt: skip
DISK_COLUMNS = ["host", "vm", "device", "bus", "path", "format", "virtual_size", "allocated_bytes", "mode"]


def _mib(n: int | None) -> str:
    return "" if n is None else str(n // 2**20)


def vm_rows(inv: Inventory) -> list[dict[str, str]]:
    """One flat row per VM (csv, markdown, the Prefect table artifact)."""

    def s(v: object) -> str:
        return "" if v is None else str(v)

    return [
        {
            "host": vm.host, "vm": vm.name, "driver": vm.driver, "status": s(vm.status),
            "qemu_version": s(vm.qemu_version), "cpus": s(vm.cpus), "memory_mb": _mib(vm.memory_bytes),
            "disks": "; ".join(
                f"{d.device} ({d.bus}, {d.format}, {_mib(d.virtual_size)} MiB)" for d in vm.disks
            ),
            "nics": "; ".join(f"{n.model} {n.mac}" for n in vm.nics),
            "cdroms": "; ".join(f"{c.device} ({c.path or 'empty'})" for c in vm.cdroms),
            "startup_order": s(vm.startup_order), "cpu_limit": s(vm.cpu_limit),
            "cpu_weight": s(vm.cpu_weight),
            "memory_limit_mb": _mib(vm.memory_limit_bytes), "os": s(vm.os), "policy": s(vm.policy),
            "config_files": "; ".join(vm.config_files), "external_data": "; ".join(vm.external_data),
            "error": s(vm.error),
        }  # fmt: skip
        for vm in inv.vms
    ]


def disk_rows(inv: Inventory) -> list[dict[str, str]]:
    return [
        {
            "host": vm.host, "vm": vm.name, "device": d.device, "bus": d.bus, "path": d.path,
            "format": d.format, "virtual_size": str(d.virtual_size),
            "allocated_bytes": "" if d.allocated_bytes is None else str(d.allocated_bytes), "mode": d.mode,
        }  # fmt: skip
        for vm in inv.vms
        for d in vm.disks
    ]


def _md(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[dict[str, str]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md(r[c]) for c in columns) + " |" for r in rows]
    return lines


def render(inv: Inventory, fmt: Format) -> bytes:
    if fmt == "json":
        return (inv.model_dump_json(indent=2) + "\n").encode()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=VM_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(vm_rows(inv))
        return buf.getvalue().encode()
    if fmt == "md":
        lines = [f"# VM inventory ({inv.collected_at:%Y-%m-%d %H:%M} UTC)", "", "## VMs", ""]
        lines += _md_table(vm_rows(inv), VM_COLUMNS)
        lines += ["", "## Disks", ""] + _md_table(disk_rows(inv), DISK_COLUMNS)
        return ("\n".join(lines) + "\n").encode()
    if fmt == "xlsx":
        from openpyxl import Workbook

        wb = Workbook()
        sheets = (("VMs", VM_COLUMNS, vm_rows(inv)), ("Disks", DISK_COLUMNS, disk_rows(inv)))
        for i, (title, columns, rows) in enumerate(sheets):
            ws = wb.active if i == 0 else wb.create_sheet()
            ws.title = title
            ws.append(columns)
            for r in rows:
                ws.append([r[c] for c in columns])
        buf = io.BytesIO()
        wb.save(buf)
        return buf.getvalue()
    raise HotvmError(f"unknown inventory format '{fmt}'", f"use one of: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- versions on a target


def version_name(at: dt.datetime) -> str:
    return f"{at.astimezone(dt.UTC):%Y%m%dT%H%M%S%fZ}.json"


def stored_versions(repo: Repository) -> list[str]:
    """Names of the stored inventories, oldest first."""
    return sorted(n for n in repo.target.listdir(INVENTORY_DIR) if n.endswith(".json"))


def load(repo: Repository, name: str) -> Inventory:
    return Inventory.model_validate(json.loads(repo.read_file(f"{INVENTORY_DIR}/{name}")))


def latest(repo: Repository, before: str | None = None) -> tuple[str, Inventory] | None:
    """The newest stored inventory (older than `before`), or None."""
    names = [n for n in stored_versions(repo) if before is None or n < before]
    return (names[-1], load(repo, names[-1])) if names else None


def store(repo: Repository, inv: Inventory) -> tuple[str, str | None, Inventory | None]:
    """Write `inv` as a new version (encrypted if the repository is); returns (its path, the previous
    version's name, the previous inventory) so the caller can report the diff."""
    name = version_name(inv.collected_at)
    previous = latest(repo, before=name)
    repo.write_file(f"{INVENTORY_DIR}/{name}", render(inv, "json"))
    prev_name, prev = previous if previous else (None, None)
    return f"{INVENTORY_DIR}/{name}", prev_name, prev
