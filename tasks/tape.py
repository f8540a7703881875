"""Tape copy steps. The copy itself is one step: a tape is written in one forward pass, and a retry would
start a new copy after the unfinished one (which then protects nothing), so it is not retried."""

from __future__ import annotations

from prefect import task

from hotvm.config_file import load_config
from hotvm.formats.opener import open_repository
from hotvm.tape import copy as tape_copy
from hotvm.tape import open_tape
from tasks._options import STEP

ONE_PASS = {**STEP, "retries": 0}


@task(name="copy_to_tape", task_run_name="copy_to_tape", **ONE_PASS)
def copy_to_tape(tape: str, target: str | None, vms: list[str] | None, config: str | None = None) -> dict:
    cfg = load_config(config)
    tape_cfg = cfg.find_tape(tape)
    target_cfg = cfg.find_target(target)
    with open_repository(cfg, target_cfg.name) as repo:
        return tape_copy.copy_to_tape(
            repo, open_tape(cfg, tape), target_name=target_cfg.name, vms=vms, keep_days=tape_cfg.keep.days,
        )


@task(name="store_tape_catalog", task_run_name="store_tape_catalog", **STEP)
def store_catalog(catalog: dict, config: str | None = None) -> str:
    """The copy's catalog, also kept in the source repository (tapes/<tape>/catalog-<copy>.json)."""
    with open_repository(config, catalog["target"]) as repo:
        return tape_copy.store_catalog(repo, catalog)


@task(name="tape_catalogs", task_run_name="tape_catalogs", **STEP)
def tape_catalogs(tape: str, config: str | None = None) -> list[dict]:
    """The catalogs of every complete copy, read from the tapes themselves (no repository needed)."""
    return tape_copy.catalogs_from_scan(tape_copy.scan_library(open_tape(config, tape)))


@task(name="restore_from_tape", task_run_name="restore_from_tape", retries=0)
def restore_from_tape(
    tape: str, catalogs: list[dict], vm: str, backup_id: str | None, dest: str, fmt: str, config: str | None
) -> dict:
    from pathlib import Path

    cfg = load_config(config)
    entry = tape_copy.find_set(catalogs, vm, backup_id)
    source = next((c["target"] for c in catalogs if c["copy_id"] == entry["copy_id"]), None)
    key_config = next((t for t in cfg.targets if t.name == source), None)
    return tape_copy.restore_from_tape(
        open_tape(cfg, tape), catalogs, vm, backup_id, Path(dest), fmt, key_config=key_config
    )
