"""`hotvm status`: what each configured VM looks like now, straight from its hypervisor."""

from __future__ import annotations

from hotvm.errors import HotvmError
from hotvm.hypervisors import open_driver
from hotvm.models import HostConfig, VMConfig


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
