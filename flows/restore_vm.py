"""restore_vm: write a backup set's disks and config files to a directory, optionally boot-check it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._handoff import handed_off
from flows._runs import vm_run_name
from hotvm.errors import HotvmError
from hotvm.restore import check_disk_format, completed_restore, mark_restored, prepare_destination
from hotvm.standby import restore_dir_on_host, staged_on_host
from tasks.restore import boot_check, find_backup, record_restore_test, restore_config, restore_disk
from tasks.sync import register_vm


@flow(name="restore-vm", flow_run_name=vm_run_name("restore"))
def restore_vm(
    vm: str,
    to: str | None = None,
    backup_id: str | None = None,
    target: str | None = None,
    fmt: str = "qcow2",
    boot_check_restored: bool = False,
    config: str | None = None,
    to_host: str | None = None,
    name: str | None = None,
    start: bool = False,
) -> dict:
    """Restore the latest (or the given) backup of a VM into the directory `to`.

    to_host: also register the restored VM on that host (as `name`, default the VM's own name; another
    name gets a new UUID and MACs), its disks by default in the host's vm_dir/NAME; `start` starts it.

    Args:
        vm: The VM's name in hotvm.yaml (its backups on the target).
        to: Directory to restore into (created; must be empty or absent). Empty: needs to_host.
        backup_id: The backup set to restore; empty: the VM's latest complete one.
        target: The target's name in hotvm.yaml; empty: the default target.
        fmt: Format of the restored disks: qcow2 or raw.
        boot_check_restored: Boot the restored VM isolated (no network) until its ready pattern.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        to_host: Also register the restored VM on this host of hotvm.yaml (run on that host's queue).
        name: Name of the restored VM on to_host; empty: the VM's own name.
        start: Start the VM registered on to_host.
    """
    check_disk_format(fmt)
    if (handed := handed_off("restore", vm, to_host, config)) is not None:
        return handed  # registering on to_host: done by that host's worker
    if to is None and to_host is None:
        raise HotvmError("restore needs a destination", "pass to (a directory) or to_host (a host)")
    manifest = find_backup(vm, target, backup_id, config)
    dest = Path(to or restore_dir_on_host(config, to_host, name or vm, manifest.backup_id)).resolve()
    staging = to is None and staged_on_host(config, to_host)  # vSphere: the datastore keeps the disks
    if staging:
        shutil.rmtree(dest, ignore_errors=True)  # an earlier attempt's staging copy
    keep = to is None and not staging  # the host's vm_dir: a rerun re-registers what is already there
    done = completed_restore(dest, manifest.backup_id, fmt) if keep else None
    if done is not None:
        disks, config_files = done
        get_run_logger().info("%s already holds %s %s: registering it again", dest, vm, manifest.backup_id)
    else:
        prepare_destination(dest)
        disks = [restore_disk(manifest, d.device, str(dest), fmt, target, config) for d in manifest.disks]
        config_files = restore_config(manifest, str(dest), target, config)
        if keep:
            mark_restored(dest, manifest.backup_id, disks, config_files)
    result = {
        "vm": vm,
        "backup_id": manifest.backup_id,
        "to": str(dest),
        "disks": [
            {"device": d.device, "path": d.path, "format": d.format, "bytes": d.virtual_size} for d in disks
        ],
        "config_files": config_files,
        "boot_check": None,
    }
    if boot_check_restored:
        check = boot_check(manifest, disks, str(dest))
        result["boot_check"] = check.as_dict()
        record_restore_test(manifest, result, target, config)
    booted = not boot_check_restored or result["boot_check"]["ok"]
    if to_host is not None and booted:  # a copy that failed its boot check is not registered
        result["registered"] = register_vm(manifest, to_host, name or vm, disks, target, config, start)
    if staging and "registered" in result:
        shutil.rmtree(dest.parent, ignore_errors=True)  # uploaded to the host's datastore by register_vm
    else:
        (dest / "restore.json").write_text(json.dumps(result, indent=2))
    create_table_artifact(
        result["disks"],
        key="restore-" + "".join(c if c.isalnum() else "-" for c in vm.lower()),
        description=f"restore of {vm} {manifest.backup_id}",
    )
    get_run_logger().info("restored %s %s into %s", vm, manifest.backup_id, dest)
    if boot_check_restored and not result["boot_check"]["ok"]:
        raise HotvmError(
            f"restored VM {vm} did not come up in the boot check",
            f"see {dest}/boot-check.log; the disks are kept for inspection",
        )
    return result
