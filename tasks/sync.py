"""Tasks around registering backed-up VMs on hosts (restore --to-host, config sync to a standby)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from hotvm import standby
from hotvm.formats.manifest import Manifest
from hotvm.formats.restore import RestoredDisk
from tasks._options import STEP


@task(name="sync_config", task_run_name="sync_config {vm}", **STEP)
def sync_vm_config(
    vm: str,
    standby_host: str | None = None,
    with_disks: bool = False,
    target: str | None = None,
    config: str | None = None,
    start: bool = False,
) -> dict:
    """Register the VM's latest backup on its standby host (idempotent: a rerun changes nothing)."""
    result = standby.sync_config(config, vm, standby_host, with_disks, target, start)
    get_run_logger().info("VM %s: standby on %s %s", vm, result["host"], result["action"])
    return result


@task(name="register_vm", task_run_name="register_vm {name}", **STEP)
def register_vm(
    manifest: Manifest,
    host: str,
    name: str,
    disks: list[RestoredDisk],
    target: str | None = None,
    config: str | None = None,
    start: bool = False,
) -> dict:
    """Register restored disks as VM `name` on `host` (new UUID and MACs unless it keeps the name)."""
    paths = {d.device: Path(d.path) for d in disks}
    return standby.register_restored(config, manifest, host, name, paths, target, start)
