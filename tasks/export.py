from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from hotvm import backup
from hotvm import progress as progress_events
from hotvm.formats.manifest import DiskRecord
from hotvm.hypervisors.base import FrozenDisk
from tasks._options import STEP

UI_UPDATE_S = 5.0


@task(name="export_disk", task_run_name="export {frozen.device}", **STEP)
def export_disk(
    vm: str,
    target: str | None,
    backup_id: str,
    frozen: FrozenDisk,
    config: str | None = None,
    baseline: backup.Baseline | None = None,
) -> DiskRecord:
    """Stream the frozen disk into the target (only changed chunks when the baseline's bitmap is good)."""
    log = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"export of {vm}/{frozen.device}")
    last_update = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        progress_events.emit("export", f"{vm}/{frozen.device}", done, total)
        # Each UI update is a round trip to the API on the export's hot path: a few per minute suffice.
        if time.monotonic() - last_update[0] >= UI_UPDATE_S or done == total:
            last_update[0] = time.monotonic()
            pct = 100.0 * done / total if total else 100.0
            update_progress_artifact(artifact, pct)
            log.info("export %s: %.0f%% of %d MiB allocated", frozen.device, pct, total >> 20)

    record = backup.export_disk(
        backup.open_session(vm, config), target, backup_id, frozen, progress, baseline
    )
    log.info(
        "exported %s (%s): %d MiB read, %d MiB new in the store, %.2f s",
        frozen.device,
        record.export_mode,
        record.bytes_read >> 20,
        record.bytes_new >> 20,
        record.export_seconds,
    )
    return record
