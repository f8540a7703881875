"""tape_copy: seed Table 7.3 "weekly copy of the image repository to tape, kept two months".

    copy_to_tape (one forward pass: label, one tar archive per set, catalog) -> store_tape_catalog

tape_restore: a VM's disks and config straight from tape, with the catalogs read from the tapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment

from flows._runs import fleet_run_name, nothing_configured, vm_run_name
from hotvm.config_file import load_config
from hotvm.restore import check_disk_format, prepare_destination
from tasks.tape import copy_to_tape, restore_from_tape, store_catalog, tape_catalogs


@flow(name="tape-copy", flow_run_name=fleet_run_name("weekly-tape", "tape"))
def tape_copy(
    tape: str, target: str | None = None, vms: list[str] | None = None, config: str | None = None
) -> dict:
    """Copy every complete backup set of the target (or those of `vms`) to the tape as one new copy.

    Args:
        tape: The tape's name in hotvm.yaml (tapes:).
        target: The target's name in hotvm.yaml; empty: the default target.
        vms: Only these VMs' sets; empty: every VM on the target.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    if deployment.id and not load_config(config).tapes:  # a misnamed tape still fails (find_tape)
        return nothing_configured("weekly-tape", f"a tape named '{tape}' (tapes:)")
    catalog = copy_to_tape(tape, target, vms or None, config)
    stored = store_catalog(catalog, config)
    rows = artifact_rows(catalog)
    create_table_artifact(
        rows, key=f"tape-copy-{_key(tape)}",
        description=f"tape copy {catalog['copy_id']} of '{catalog['target']}' to '{tape}' on "
        f"{', '.join(catalog['media'])}, expires {catalog['expires'][:10]}",
    )
    get_run_logger().info(
        "tape copy %s: %d set(s) on %s, expires %s", catalog["copy_id"], len(catalog["sets"]),
        ", ".join(catalog["media"]), catalog["expires"],
    )
    return {**catalog, "catalog_path": stored}


def artifact_rows(catalog: dict) -> list[dict]:
    return [
        {
            "vm": s["vm"],
            "backup": s["backup_id"],
            "where": ", ".join(f"{p['medium']} file {p['file']}" for p in s["parts"]),
            "MiB": round(s["size"] / 2**20, 1),
            "chunks": s["chunks"],
            "sha256": s["sha256"][:16],
        }
        for s in catalog["sets"]
    ]


@flow(name="tape-restore", flow_run_name=vm_run_name("tape-restore"))
def tape_restore(
    vm: str, tape: str, to: str, backup_id: str | None = None, fmt: str = "qcow2", config: str | None = None
) -> dict:
    """Restore the latest (or the given) backup of a VM straight from tape into the directory `to`.

    Args:
        vm: The VM's name (as backed up).
        tape: The tape's name in hotvm.yaml (tapes:).
        to: Directory on the worker to restore into (created; must be empty or absent).
        backup_id: The backup set to restore; empty: the VM's latest one on the tape.
        fmt: Format of the restored disks: qcow2 or raw.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    check_disk_format(fmt)
    dest = Path(to).resolve()
    prepare_destination(dest)
    catalogs = tape_catalogs(tape, config)
    result = restore_from_tape(tape, catalogs, vm, backup_id, str(dest), fmt, config)
    result["tape"] = tape
    (dest / "restore.json").write_text(json.dumps(result, indent=2))
    create_table_artifact(result["disks"], key=f"tape-restore-{_key(vm)}",
                          description=f"restore of {vm} {result['backup_id']} from tape '{tape}'")
    get_run_logger().info("restored %s %s from tape %s into %s", vm, result["backup_id"], tape, dest)
    return result


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
