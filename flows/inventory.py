"""inventory: the weekly VM inventory (recovery plan step 1), versioned on a target and diffed.

    collect_inventory -> store_inventory (inventory/<timestamp>.json) -> diff_inventory vs the previous one

Artifacts: a table of every VM, and the changes since the previous inventory as markdown (a VM that no
policy covers is a warning).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._runs import artifact_key, fleet_run_name
from hotvm.config_file import load_config
from hotvm.inventory import diff_markdown, vm_rows
from tasks.inventory import collect_inventory, diff_inventory, store_inventory


@flow(name="inventory", flow_run_name=fleet_run_name("inventory"))
def inventory(target: str | None = None, config: str | None = None) -> dict:
    """Collect every VM of every host, store it as a new version on the target, report what changed.

    Args:
        target: The target's name in hotvm.yaml; empty: the default target.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    log = get_run_logger()
    target_name = load_config(config).find_target(target).name
    current = collect_inventory(config)
    stored, prev_name, previous = store_inventory(current, target_name, config)
    change = diff_inventory(previous, current)
    key = artifact_key(target_name)
    unreachable = sum(1 for vm in current.vms if vm.error)
    create_table_artifact(
        vm_rows(current),
        key=f"inventory-{key}",
        description=f"{len(current.vms)} VM(s), {unreachable} unreachable; stored as {stored}",
    )
    create_markdown_artifact(
        diff_markdown(change, prev_name), key=f"inventory-diff-{key}", description="changes since last run"
    )
    log.info(
        "inventory of %d VM(s) stored as %s on '%s': %d added, %d removed, %d change(s), %d warning(s)",
        len(current.vms), stored, target_name, len(change.added), len(change.removed), len(change.changed),
        len(change.warnings),
    )  # fmt: skip
    return {
        "target": target_name,
        "stored": stored,
        "previous": prev_name,
        "vms": len(current.vms),
        "unreachable": unreachable,
        "diff": change.model_dump(),
    }
