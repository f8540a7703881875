"""`hotvm status`: what each configured VM looks like now, straight from its hypervisor."""

from __future__ import annotations

from hotvm.config import Config, HostConfig, VMConfig
from hotvm.errors import HotvmError
from hotvm.hypervisors import open_driver
from hotvm.hypervisors.resolve import ResolvedVMs, resolve_vms


def fleet_status(config: Config) -> list[dict]:
    """Every configured VM, then the instant restores running on this host: `hotvm status`."""
    return status_rows(resolve_vms(config)) + instant_status_rows()


def set_rows(entries: list) -> list[dict]:
    """`hotvm list`: one row per backup set (`Repository.list_sets` entries); incomplete ones say so."""
    return [
        {
            "vm": e.vm,
            "backup_id": e.backup_id,
            "complete": e.complete,
            "completed_at": e.manifest.completed_at.isoformat() if e.manifest else None,
            "disks": [d.device for d in e.manifest.disks] if e.manifest else [],
            "bytes": sum(d.virtual_size for d in e.manifest.disks) if e.manifest else 0,
            "consistency": e.manifest.consistency if e.manifest else None,
        }
        for e in entries
    ]


def status_rows(resolved: ResolvedVMs) -> list[dict]:
    """One row per resolved VM, then one per host whose VMs could not be listed (named, with the fix)."""
    rows = [vm_status(host, vm) for host, vm in resolved]
    rows += [
        {"host": f.host, "vm": f"(VMs of {f.host})", "state": f"unreachable: {f}", "disks": [], "jobs": []}
        for f in resolved.failures
    ]
    return rows


def vm_status(host: HostConfig, vm: VMConfig) -> dict:
    """One row per VM; an unreachable VM is a row that says why, not an error for the whole command."""
    row: dict = {"host": host.name, "vm": vm.name, "state": "unknown", "disks": [], "jobs": []}
    try:
        driver = open_driver(host, vm)
        try:
            description = driver.describe_vm()
            disks = driver.list_disks()
        finally:
            driver.close()
    except HotvmError as exc:
        row["state"] = f"unreachable: {exc.message}"
        return row
    row["state"] = str(description.get("status", "running"))
    row["jobs"] = [
        f"{j.get('id', j.get('device'))} {j.get('type', '')} {j.get('status', '')}".strip()
        for j in description.get("block_jobs", [])
    ]
    row["disks"] = [
        {"device": d.device, "mode": d.mode.value, "path": d.path, "hotvm_overlays": list(d.hotvm_overlays)}
        for d in disks
    ]
    return row


def instant_status_rows() -> list[dict]:
    """Instant restores on this host (docs/instant.md): a VM that still reads its disks from a repository
    says so, with its stream's progress."""
    from hotvm.instant.core import status_row
    from hotvm.instant.state import forget, indexed_restores

    rows = []
    for state in indexed_restores():
        try:
            row = status_row(state)
            if row["instant"]["status"] == "complete" and not row["instant"]["running"]:
                forget(state)  # stopped, on local disks only: nothing instant about it any more
                continue
            rows.append(row)
        except HotvmError as exc:
            rows.append({"host": "instant", "vm": state.vm, "state": f"unknown: {exc.message}", "disks": [],
                         "jobs": []})  # fmt: skip
    return rows
