"""What every flow that puts overlays on a VM does when it fails (image and file-level alike)."""

from __future__ import annotations

from prefect import get_run_logger

from hotvm.hypervisors.base import FrozenDisk
from tasks.bitmaps import drop_bitmaps
from tasks.reconcile import rollback_vm


def roll_back(vm: str, config: str | None, frozen: list[FrozenDisk], journaled: set[str]) -> None:
    """Commit the overlays back first (never leave the VM on one), then drop this run's dirty bitmaps on
    the disks whose work was not journaled (a resume relies on the others). The previous set's bitmap
    stays everywhere: it has seen every write since the last good backup. After the rollback, because a
    persistent bitmap is read-only while its image is frozen under an overlay."""
    rollback_vm(vm, config)
    unused = {d.device: [d.bitmap] for d in frozen if d.bitmap and d.device not in journaled}
    try:
        if unused:
            drop_bitmaps(vm, unused, config)
    except Exception as exc:  # noqa: BLE001 - a stray bitmap costs memory, not correctness
        get_run_logger().warning("could not remove this run's dirty bitmaps %s: %s", unused, exc)
