from __future__ import annotations

from prefect import task

from hotvm import backup
from hotvm.formats.manifest import ConfigArchive
from tasks._options import STEP


@task(name="backup_config", task_run_name="backup_config", **STEP)
def backup_config(vm: str, target: str | None, backup_id: str, config: str | None = None) -> ConfigArchive:
    """The seed's VMX tar: config files and the VM description, versioned per backup."""
    return backup.backup_config(backup.open_session(vm, config), target, backup_id)
