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
