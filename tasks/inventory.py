"""Inventory steps, each a thin task over hotvm.inventory: collect, store a new version, diff (pure)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hotvm import inventory
from hotvm.config_file import load_config
from hotvm.formats.opener import open_repository
from hotvm.inventory import Inventory, InventoryDiff
from tasks._options import STEP


@task(name="collect_inventory", task_run_name="collect_inventory", **STEP)
def collect_inventory(config: str | None = None) -> Inventory:
    """Every VM of every host as its hypervisor reports it now (unreachable VMs keep a row with why)."""
    inv = inventory.collect(load_config(config))
    log = get_run_logger()
    for vm in inv.vms:
        if vm.error:
            log.warning("VM '%s' on host '%s' could not be read: %s", vm.name, vm.host, vm.error)
    return inv


@task(name="store_inventory", task_run_name="store_inventory", **STEP)
def store_inventory(
    inv: Inventory, target: str | None, config: str | None = None
) -> tuple[str, str | None, Inventory | None]:
    """Write the inventory as a new version on the target; returns (path, previous name, previous)."""
    with open_repository(config, target) as repo:
        return inventory.store(repo, inv)


@task(name="diff_inventory", task_run_name="diff_inventory", retries=0, cache_policy=NO_CACHE)
def diff_inventory(previous: Inventory | None, current: Inventory) -> InventoryDiff:
    """Pure: added / removed VMs, changed hardware, VMs no policy covers (warnings)."""
    change = inventory.diff(previous, current)
    log = get_run_logger()
    for warning in change.warnings:
        log.warning("%s", warning)
    return change
