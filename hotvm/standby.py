"""Copies of backed-up VMs registered on a host: restore --to-host, and the seed's config sync to a
standby host ("Scripting the Synchronization of VMX Files to Another ESX Host").

Everything comes from the backup target, not from the VM's own host: a standby stays registrable after
that host is gone. Registering goes through the destination host's driver (base.HostDriver), so any
driver with a HostDriver works: QEMU (a launch spec in vm_dir), libvirt (defineXML), vSphere (RegisterVM).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from hotvm.config import Config, HostConfig
from hotvm.config_file import load_config
from hotvm.errors import ConfigError, HotvmError
from hotvm.formats.configtar import read_config_archive
from hotvm.formats.manifest import Manifest
from hotvm.formats.opener import open_repository
from hotvm.formats.repository import Repository
from hotvm.formats.restore import DiskFormat, check_config_archive, disk_file_name
from hotvm.hypervisors import open_host
from hotvm.hypervisors.base import Capability, RegisterResult, VMDefinition
from hotvm.hypervisors.resolve import find_vm
from hotvm.restore import restore_one_disk
from hotvm.safepath import component, under

log = logging.getLogger("hotvm.standby")

DISKS_PREFIX = "disks-"
COMPLETE_MARKER = ".complete"


def vm_definition(
    repo: Repository, manifest: Manifest, name: str, disks: dict[str, Path], new_identity: bool
) -> VMDefinition:
    """A VMDefinition from a backup set's config archive (checked against its manifest)."""
    if manifest.config_archive is None:
        raise HotvmError(
            f"backup {manifest.vm}/{manifest.backup_id} has no config archive",
            "take a new backup (config archives are part of every backup since the first release)",
        )
    blob = repo.read_blob(manifest.vm, manifest.backup_id, manifest.config_archive.name)
    contents = read_config_archive(check_config_archive(manifest, blob))
    return VMDefinition(
        name=name,
        source_vm=manifest.vm,
        source_driver=manifest.driver,
        documents=contents.documents,
        files=contents.files,
        description=contents.description or manifest.vm_description,
        disks=disks,
        new_identity=new_identity,
    )


def stages_disks(host: HostConfig) -> bool:
    """vSphere uploads restored disks to its datastore (its vm_dir is an inventory folder, not a local
    directory): the local restore is only a staging copy, removed once uploaded."""
    return host.driver == "vsphere"


def host_vm_dir(host: HostConfig, name: str) -> Path:
    """Where copies of VM `name` live on `host` (its vm_dir/NAME); for a host that stages_disks, the local
    staging directory in the temp dir (TMPDIR: it needs room for the VM's disks)."""
    if stages_disks(host):
        return under(Path(tempfile.gettempdir()) / "hotvm-staging", host.name, name, what="host or VM name")
    if host.vm_dir is None:
        raise ConfigError(
            f"host '{host.name}' has no vm_dir: hotvm does not know where to place VM '{name}' on it",
            f"set vm_dir under host '{host.name}' in hotvm.yaml (or pass --to DIR)",
        )
    return under(Path(host.vm_dir).resolve(), name, what="VM name")


def disks_dir(vm_dir: Path, backup_id: str) -> Path:
    """vm_dir/disks-<backup id>: the backup id (from a manifest: hostile) must be one path component."""
    return vm_dir / f"{DISKS_PREFIX}{component(backup_id, 'backup id')}"


def restore_disks(
    config: Config, target: str | None, manifest: Manifest, dest: Path, fmt: DiskFormat = "qcow2"
) -> dict[str, Path]:
    """Every disk of the set into `dest` (a rerun with the same set reuses a complete `dest`).

    Written into `dest.partial` and renamed when whole: a crash never leaves disks that look usable."""
    disks = {d.device: dest / disk_file_name(d.device, fmt) for d in manifest.disks}
    if (dest / COMPLETE_MARKER).exists():
        return disks
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for disk in manifest.disks:
        restore_one_disk(config, target, manifest, disk.device, partial, fmt)
    (partial / COMPLETE_MARKER).write_text(manifest.backup_id + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    return disks


def register(host: HostConfig, definition: VMDefinition, start: bool) -> RegisterResult:
    driver = open_host(host)
    try:
        if Capability.REGISTER_VMS not in driver.capabilities:
            raise HotvmError(
                f"host '{host.name}' ({host.driver}) cannot register VMs", "use a host whose driver can"
            )
        return driver.register_vm(definition, start=start)
    finally:
        driver.close()


def _result(manifest: Manifest, result: RegisterResult, disks: dict[str, Path], **extra: object) -> dict:
    return {
        "vm": manifest.vm,
        "backup_id": manifest.backup_id,
        "consistency": manifest.consistency,
        **asdict(result),
        "disks": {device: str(path) for device, path in disks.items()},
        **extra,
    }


# --------------------------------------------------------------------------- restore --to-host


def register_restored(
    config: Config | str | Path | None,
    manifest: Manifest,
    host: str,
    name: str,
    disks: dict[str, Path],
    target: str | None = None,
    start: bool = False,
) -> dict:
    """Register restored disks as VM `name` on `host`: a new identity unless it keeps the VM's name."""
    cfg = load_config(config)
    host_cfg = cfg.find_host(host)
    with open_repository(cfg, target) as repo:
        definition = vm_definition(repo, manifest, name, disks, new_identity=name != manifest.vm)
    result = register(host_cfg, definition, start)
    return _result(manifest, result, disks, new_identity=definition.new_identity)


def restore_dir_on_host(config: Config | str | Path | None, host: str, name: str, backup_id: str) -> Path:
    """Default place for the disks of a restore --to-host: the host's vm_dir/NAME/disks-<backup>."""
    return disks_dir(host_vm_dir(load_config(config).find_host(host), name), backup_id)


def staged_on_host(config: Config | str | Path | None, host: str) -> bool:
    """True when a restore --to-host `host` without --to only stages the disks locally (see stages_disks)."""
    return stages_disks(load_config(config).find_host(host))


# --------------------------------------------------------------------------- config sync to a standby


def standby_vms(config: Config | str | Path | None) -> list[tuple[str, str]]:
    """(vm, standby host) of every configured VM that names a standby_host."""
    cfg = load_config(config)
    return [(vm.name, vm.standby_host) for h in cfg.hosts for vm in h.vms if vm.standby_host]


def sync_config(
    config: Config | str | Path | None,
    vm: str,
    standby: str | None = None,
    with_disks: bool = False,
    target: str | None = None,
    start: bool = False,
) -> dict:
    """Register the VM's latest complete backup on its standby host, powered off (unless `start`).

    Same identity (name, UUID, MACs): it replaces the VM when its host fails. Without disks the standby
    points at the VM's own disk files (the seed's shared SAN storage); with_disks restores the latest
    backup's disks into the standby's vm_dir first. Reruns: identical -> unchanged, changed -> updated."""
    cfg = load_config(config)
    host_name = standby or _configured_standby(cfg, vm)
    standby_host = cfg.find_host(host_name)
    try:
        source_host, _ = find_vm(cfg, vm)
    except HotvmError:
        source_host = None  # gone from the config (disaster): the backup alone is enough
    if source_host is not None and source_host.name == standby_host.name:
        raise ConfigError(
            f"VM '{vm}': standby host '{host_name}' is the VM's own host", "give another host as standby"
        )
    with open_repository(cfg, target) as repo:
        manifest = repo.latest(vm)
        disks: dict[str, Path] = {}
        if with_disks:
            vmdir = host_vm_dir(standby_host, vm)
            fmt: DiskFormat = "raw" if stages_disks(standby_host) else "qcow2"  # raw: what a datastore takes
            disks = restore_disks(cfg, target, manifest, disks_dir(vmdir, manifest.backup_id), fmt)
        definition = vm_definition(repo, manifest, vm, disks, new_identity=False)
    try:
        result = register(standby_host, definition, start)
    finally:
        if with_disks and stages_disks(standby_host):
            shutil.rmtree(host_vm_dir(standby_host, vm), ignore_errors=True)  # uploaded (or to redo)
    if with_disks and result.action != "unchanged" and not stages_disks(standby_host):
        _drop_older_disks(standby_host, vm, keep=f"{DISKS_PREFIX}{manifest.backup_id}")
    log.info("VM %s: standby on %s %s from backup %s", vm, host_name, result.action, manifest.backup_id)
    return _result(manifest, result, disks, standby=host_name)


def _configured_standby(cfg: Config, vm: str) -> str:
    _, vm_cfg = find_vm(cfg, vm)
    if not vm_cfg.standby_host:
        raise ConfigError(
            f"VM '{vm}' has no standby_host",
            f"set standby_host for VM '{vm}' in hotvm.yaml or pass --standby",
        )
    return vm_cfg.standby_host


def _drop_older_disks(host: HostConfig, vm: str, keep: str) -> None:
    """Disk sets of earlier syncs, once the standby points at the new one (never while it runs)."""
    driver = open_host(host)
    try:
        if Capability.RUNNING_STATE not in driver.capabilities or driver.running(vm):
            return  # a VM that may run keeps its disks
    finally:
        driver.close()
    for old in host_vm_dir(host, vm).glob(f"{DISKS_PREFIX}*"):
        if old.name != keep and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "host_vm_dir",
    "register_restored",
    "restore_dir_on_host",
    "restore_disks",
    "staged_on_host",
    "stages_disks",
    "standby_vms",
    "sync_config",
    "vm_definition",
]
