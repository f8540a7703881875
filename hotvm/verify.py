"""Restore tests ("test test test", like Veeam SureBackup) and recovery by tier, as plain functions.

verify_set restores one backup set into a private scratch directory (every chunk is checked on the way, the
config archive against its sha256), optionally boots it isolated (no network, snapshot=on, TCG) until its
BootCheckSpec's ready pattern, and records the result beside the set (restore-tests/<stamp>.json, with
`verified` and `problems`): restore + boot seconds is the VM's measured RTO. A failed test leaves a record
with verified=false: the set is unverified until a later test passes.

recover_tier restores every VM of a tier into DIR/<vm>/ in recovery order, at most the host's
max_concurrent_backups at a time, and compares each measured time with the VM's RTO (if it has one).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from hotvm import restore
from hotvm.bootcheck import boot_check_restored
from hotvm.config import Config
from hotvm.config_file import load_config
from hotvm.errors import HotvmError
from hotvm.formats.manifest import Manifest
from hotvm.formats.opener import open_repository
from hotvm.formats.repository import Repository
from hotvm.formats.restore import DiskFormat
from hotvm.hypervisors.resolve import HostFailure, ResolvedVMs, resolve_vms
from hotvm.safepath import component, under

DEFAULT_TIER = 1


# ----------------------------------------------------------------------------- tier / RTO lookups


def _vm_entry(cfg: Config, vm: str, resolved: ResolvedVMs | None = None):  # noqa: ANN202
    """(HostConfig, VMConfig) of `vm` among the run's resolved VMs (default: listed ones only, no
    connection), or (None, None)."""
    found = resolved.find(vm) if resolved is not None else cfg.listed_vm(vm)
    return found if found is not None else (None, None)


def vm_setting(
    cfg: Config, vm: str, name: Literal["tier", "rto", "startup_order"], resolved: ResolvedVMs | None = None
):  # noqa: ANN201
    """A per-VM value (tier, rto, startup_order): the VM's own, else its policy's (tier, rto), else None."""
    from hotvm.policies import policy_for_vm

    _, entry = _vm_entry(cfg, vm, resolved)
    value = getattr(entry, name) if entry is not None else None  # a field of VMConfig: no default needed
    if value is not None or name == "startup_order":  # a policy orders no VMs
        return value
    policy = policy_for_vm(cfg, vm)
    return getattr(policy, name) if policy is not None else None


def vm_tier(cfg: Config, vm: str, resolved: ResolvedVMs | None = None) -> int:
    tier = vm_setting(cfg, vm, "tier", resolved)
    return int(tier) if tier is not None else DEFAULT_TIER


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(value: object) -> float | None:
    """'30m', '24h', '90s', '1d', a number of seconds or a timedelta -> seconds (None if absent)."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    total, pos = 0.0, 0
    text = str(value).replace(" ", "").lower()
    for m in re.finditer(r"(\d+(?:\.\d+)?)([smhdw])", text):
        if m.start() != pos:
            return None
        total, pos = total + float(m.group(1)) * _UNITS[m.group(2)], m.end()
    return total if pos == len(text) and text else None


def vm_rto_seconds(cfg: Config, vm: str, resolved: ResolvedVMs | None = None) -> float | None:
    return duration_seconds(vm_setting(cfg, vm, "rto", resolved))


# ----------------------------------------------------------------------------- restore tests


def _named(device: str, exc: HotvmError) -> str:
    text = exc.message
    return text if f"'{device}'" in text else f"disk '{device}': {text}"


def restore_into(
    cfg: Config, target: str | None, manifest: Manifest, dest: Path, fmt: DiskFormat, boot: bool
) -> dict:
    """Restore (and optionally boot) one set into `dest`; never raises for damage, reports it instead."""
    started = time.monotonic()
    problems: list[str] = []
    disks = []
    for record in manifest.disks:
        try:
            disks.append(restore.restore_one_disk(cfg, target, manifest, record.device, dest, fmt))
        except HotvmError as exc:
            problems.append(_named(record.device, exc))
    config_files: list[str] = []
    try:
        config_files = restore.restore_config_files(cfg, target, manifest, dest)
    except HotvmError as exc:
        problems.append(exc.message)
    restore_seconds = round(time.monotonic() - started, 3)
    boot_result = None
    if boot and not problems:
        boot_result = boot_check_restored(manifest, disks, dest).as_dict()
        if not boot_result["ok"]:
            problems.append(f"boot check failed: {boot_result['detail']}")
    ready = restore_seconds + (boot_result["seconds"] if boot_result else 0.0)
    return {
        "vm": manifest.vm,
        "backup_id": manifest.backup_id,
        "host": manifest.host,
        "disks": [
            {"device": d.device, "path": d.path, "format": d.format, "bytes": d.virtual_size} for d in disks
        ],
        "config_files": config_files,
        "restore_seconds": restore_seconds,
        "boot_check": boot_result,
        "seconds_to_ready": round(ready, 3),
        "verified": not problems,
        "problems": problems,
    }


def verify_set(
    config: Config | str | Path | None,
    vm: str,
    target: str | None = None,
    backup_id: str | None = None,
    *,
    boot: bool = False,
    keep: bool = False,
    fmt: DiskFormat = "qcow2",
    instant: bool = True,
) -> dict:
    """Restore-test one set (default: the VM's latest complete one) and record the result beside it.

    boot (with instant, the default): boot straight from the set, then stream it (every chunk checked):
    time to ready in seconds of I/O whatever the disk size (docs/instant.md)."""
    cfg = load_config(config)
    manifest = restore.find_backup(cfg, vm, target, backup_id)
    scratch = Path(tempfile.mkdtemp(prefix=f"hotvm-verify-{component(manifest.vm, 'VM name')}-"))
    try:
        if boot and instant:
            from hotvm.instant.boottest import instant_boot_test

            result = instant_boot_test(cfg, target, manifest, scratch)
        else:
            result = restore_into(cfg, target, manifest, scratch, fmt, boot)
        result["mode"] = ("instant-boot" if instant else "boot") if boot else "checksums"
        result["scratch"] = str(scratch) if keep else None
        result["record"] = restore.record_restore_test(cfg, target, manifest, result)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def restore_tests(repo: Repository, vm: str, backup_id: str) -> list[dict]:
    """The recorded restore tests of a set, oldest first."""
    base = f"{repo.set_path(vm, backup_id)}/restore-tests"
    records = []
    for name in sorted(repo.target.listdir(base)):
        if not name.endswith(".json") or ".tmp-" in name:
            continue
        try:
            records.append(json.loads(repo.read_file(f"{base}/{name}")))
        except (FileNotFoundError, ValueError, HotvmError):
            continue
    return records


def set_verified(repo: Repository, vm: str, backup_id: str) -> bool | None:
    """True/False: the latest restore test of the set passed/failed; None: never tested."""
    tests = restore_tests(repo, vm, backup_id)
    return bool(tests[-1].get("verified", True)) if tests else None


def last_verified_at(repo: Repository, vm: str) -> str:
    """When any set of the VM was last restore-tested ('' if never): the rotation key for `sample`."""
    stamps = [
        t.get("tested_at", "")
        for e in repo.list_sets(vm)
        if e.manifest
        for t in restore_tests(repo, e.vm, e.backup_id)
    ]
    return max(stamps, default="")


def vms_to_verify(
    config: Config | str | Path | None, target: str | None, sample: int | None = None
) -> list[str]:
    """Every VM with a complete set on the target; with `sample`, that many, least recently tested first."""
    cfg = load_config(config)
    with open_repository(cfg, target) as repo:
        vms = sorted({e.vm for e in repo.list_sets() if e.manifest})
        if sample:
            vms = sorted(vms, key=lambda v: (last_verified_at(repo, v), v))[:sample]
    return vms


# ----------------------------------------------------------------------------- recovery by tier


def recovery_plan(
    config: Config | str | Path | None, tier: int, target: str | None, resolved: ResolvedVMs | None = None
) -> list[dict]:
    """The VMs of `tier` with a complete backup on the target, in recovery order (startup_order, then
    name), each with the host whose concurrency caps it. VMs only on the target are tier 1. `resolved`:
    the run's VMs (default: resolved here, once)."""
    cfg = load_config(config)
    resolved = resolved if resolved is not None else resolve_vms(cfg)
    with open_repository(cfg, target) as repo:
        on_target = {e.vm: e.manifest for e in repo.list_sets() if e.manifest}  # latest wins (sorted)
    plan = []
    for vm, manifest in on_target.items():
        if vm_tier(cfg, vm, resolved) != tier:
            continue
        host, _ = _vm_entry(cfg, vm, resolved)
        host_name = host.name if host is not None else manifest.host
        try:
            limit = cfg.find_host(host_name).max_concurrent_backups
        except HotvmError:
            limit = 2
        order = vm_setting(cfg, vm, "startup_order", resolved)
        plan.append(
            {
                "vm": vm,
                "host": host_name,
                "limit": limit,
                "startup_order": order,
                "rto_s": vm_rto_seconds(cfg, vm, resolved),
            }
        )
    plan.sort(key=lambda p: (p["startup_order"] is None, p["startup_order"] or 0, p["vm"]))
    return plan


def recover_tier(
    config: Config | str | Path | None,
    tier: int,
    to: str | Path,
    target: str | None = None,
    *,
    boot_check: bool = False,
    fmt: DiskFormat = "qcow2",
    restore_one: Callable[[dict, Path], dict] | None = None,
) -> list[dict]:
    """Restore every VM of `tier` into to/<vm>/: started strictly in recovery order, at most each host's
    max_concurrent_backups at once. One row per VM, with its measured time and RTO; a host whose VMs
    could not be listed adds one failed row naming it (the others are recovered all the same)."""
    cfg = load_config(config)
    resolved = resolve_vms(cfg)
    plan = recovery_plan(cfg, tier, target, resolved)
    unlisted = [_unlisted_row(f, tier) for f in resolved.failures]
    if not plan and unlisted:
        return unlisted
    if not plan:
        raise HotvmError(f"no VM of tier {tier} has a complete backup", "check the tiers in hotvm.yaml")
    base = Path(to).resolve()
    for p in plan:  # VM names read from the target's manifests: each must be one path component
        restore.prepare_destination(under(base, p["vm"], what="VM name"))
    slots: dict[str, threading.BoundedSemaphore] = {}

    def default_restore(item: dict, dest: Path) -> dict:
        manifest = restore.find_backup(cfg, item["vm"], target)
        return restore_into(cfg, target, manifest, dest, fmt, boot_check)

    run = restore_one or default_restore

    def one(item: dict, slot: threading.BoundedSemaphore) -> dict:
        try:
            return _recover_row(item, base, tier, run)
        finally:
            slot.release()

    with ThreadPoolExecutor(max_workers=max(1, sum(p["limit"] for p in plan))) as pool:
        futures = []
        for index, item in enumerate(plan, 1):
            slot = slots.setdefault(item["host"], threading.BoundedSemaphore(item["limit"]))
            slot.acquire()  # the next VM in order waits for a slot on its host: order is never overtaken
            futures.append(pool.submit(one, {**item, "index": index}, slot))
        return [f.result() for f in futures] + unlisted


def _recover_row(item: dict, base: Path, tier: int, run: Callable[[dict, Path], dict]) -> dict:
    """Restore one VM of a recovery plan into base/<vm>/ and time it against its RTO."""
    started_at = dt.datetime.now(dt.UTC).isoformat()
    t0 = time.monotonic()
    try:
        result = run(item, base / item["vm"])
    except HotvmError as exc:
        result = {"vm": item["vm"], "verified": False, "problems": [exc.message]}
    seconds = round(time.monotonic() - t0, 3)
    rto = item["rto_s"]
    return {
        **result,
        "tier": tier,
        "host": item["host"] or result.get("host"),
        "order": item["index"],
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "seconds": seconds,
        "rto_s": rto,
        "meets_rto": None if rto is None else seconds <= rto,
        "ok": bool(result.get("verified")) and (rto is None or seconds <= rto),
        "to": str(base / item["vm"]),
    }


def recover_vm(
    config: Config | str | Path | None,
    vm: str,
    to: str | Path,
    target: str | None = None,
    *,
    tier: int = DEFAULT_TIER,
    order: int = 0,
    boot_check: bool = False,
    fmt: DiskFormat = "qcow2",
) -> dict:
    """One VM of a tier recovery into to/<vm>/ (a recover-vm run): the row recover_tier makes for it."""
    cfg = load_config(config)
    base = Path(to).resolve()
    restore.prepare_destination(under(base, vm, what="VM name"))
    host, _ = _vm_entry(cfg, vm)

    def restore_latest(item: dict, dest: Path) -> dict:
        manifest = restore.find_backup(cfg, vm, target)
        return restore_into(cfg, target, manifest, dest, fmt, boot_check)

    item = {"vm": vm, "host": host.name if host else None, "rto_s": vm_rto_seconds(cfg, vm), "index": order}
    return _recover_row(item, base, tier, restore_latest)


def _unlisted_row(failure: HostFailure, tier: int) -> dict:
    """A recover row for a host that is down: its VMs' tiers are unknown, so none of them can be planned
    (VMs of it found on the target are recovered by their policy's tier all the same)."""
    return {
        "vm": f"(VMs of {failure.host})", "host": failure.host, "tier": tier, "order": 0, "seconds": 0.0,
        "rto_s": None, "meets_rto": None, "verified": False, "ok": False, "problems": [str(failure)],
    }  # fmt: skip
