from __future__ import annotations

from prefect import task

from hotvm import backup
from hotvm.formats.manifest import Manifest
from tasks._options import STEP


@task(name="transfer", task_run_name="transfer", **STEP)
def transfer(vm: str, target: str | None, manifest: Manifest, config: str | None = None) -> str:
    """Seal the set: check the chunks arrived and write the manifest, last and atomically."""
    return backup.transfer(backup.open_session(vm, config), target, manifest)
