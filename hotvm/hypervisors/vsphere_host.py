"""Host-wide vSphere operations: list VMs, register a backed-up VM (the seed's VMX sync to a standby host).

register_vm uploads the restored disks and a rewritten .vmx to `[datastore] NAME/` and calls RegisterVM_Task.
A `hotvm-register.json` beside them records the SHA-256 of every file uploaded, so a rerun with identical
content is "unchanged" without re-uploading disks, and a changed one is re-uploaded and re-registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pyVmomi import vim

from hotvm.child_env import child_env
from hotvm.errors import ConfigError, HypervisorError
from hotvm.hypervisors import vsphere_vmx as vmx
from hotvm.hypervisors.base import Capability, HostDriver, RegisterResult, VMDefinition
from hotvm.hypervisors.vsphere_conn import LazyConnection
from hotvm.safepath import component

log = logging.getLogger("hotvm.vsphere")

SIDECAR = "hotvm-register.json"


def _sha256(data: bytes | Path) -> str:
    h = hashlib.sha256()
    if isinstance(data, bytes):
        h.update(data)
    else:
        with open(data, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _raw_image(image: Path, tmp: Path) -> Path:
    """`image` as a raw file (ESX's flat extent), converting qcow2 & co. with qemu-img."""
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True,
                                     capture_output=True, text=True, env=child_env()).stdout)  # fmt: skip
    if info["format"] == "raw":
        return image
    out = tmp / (image.stem + ".raw")
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image), str(out)],
        check=True, capture_output=True, env=child_env(),
    )
    return out


def _shared_disk_paths(description: dict) -> dict[str, str]:
    """A config-only copy (no restored disks) uses the VM's own disk files, by absolute path: the seed's
    standby on shared SAN storage. A relative name would point into the copy's own, empty directory."""
    paths = {}
    for disk in description.get("disks") or []:
        if m := re.fullmatch(r"\[([^\]]+)\]\s*(.+)", str(disk.get("path") or "")):
            paths[disk["device"]] = f"/vmfs/volumes/{m[1]}/{m[2]}"
    return paths


class VSphereHost(LazyConnection, HostDriver):
    """HostDriver for a vCenter/ESXi: places registered VMs on `datastore` and in folder `vm_dir`."""

    name = "vsphere"
    capabilities = frozenset({Capability.REGISTER_VMS})

    def list_vms(self) -> list[str]:
        return self.conn.vm_names()

    # ------------------------------------------------------------------ placement

    def _datastore(self) -> vim.Datastore:
        stores = self.conn.objects(vim.Datastore, ["name"])
        if self.host.datastore:
            for ds, props in stores.items():
                if props["name"] == self.host.datastore:
                    return ds
            raise ConfigError(
                f"vSphere host '{self.host.name}' has no datastore '{self.host.datastore}' "
                f"(it has: {', '.join(sorted(p['name'] for p in stores.values()))})",
                "fix datastore: in hotvm.yaml",
            )
        if not stores:
            raise HypervisorError(f"vSphere host '{self.host.name}' has no datastore", "add one")
        return sorted(stores, key=lambda ds: stores[ds]["name"])[0]

    def _folder(self, dc: vim.Datacenter) -> vim.Folder:
        """The datacenter's VM folder, or vm_dir below it (created as needed), e.g. 'standby/web'."""
        folder = dc.vmFolder
        for part in str(self.host.vm_dir or "").strip("/").split("/"):
            if not part:
                continue
            child = next(
                (c for c in folder.childEntity if isinstance(c, vim.Folder) and c.name == part), None
            )
            folder = child or folder.CreateFolder(part)
        return folder

    def _compute(self, ds: vim.Datastore) -> tuple[vim.HostSystem, vim.ResourcePool]:
        """The first connected host that mounts the datastore, and its resource pool."""
        for mount in ds.host:
            host = mount.key
            if host.runtime.connectionState == "connected":
                return host, host.parent.resourcePool
        raise HypervisorError(f"no connected host mounts datastore {ds.name}", "check the vSphere inventory")

    # ------------------------------------------------------------------ register

    def _files(self, definition: VMDefinition, tmp: Path) -> dict[str, bytes | Path]:
        """Every file of the VM directory, by name: disks (flat + descriptor), nvram, .vmx."""
        name = definition.name
        files: dict[str, bytes | Path] = {}
        disk_files: dict[str, str] = {}
        for i, (device, image) in enumerate(sorted(definition.disks.items())):
            base = name if i == 0 else f"{name}_{i}"
            raw = _raw_image(Path(image), tmp)
            files[f"{base}-flat.vmdk"] = raw
            files[f"{base}.vmdk"] = vmx.descriptor(f"{base}-flat.vmdk", raw.stat().st_size)
            disk_files[device] = f"{base}.vmdk"
        if not definition.disks:
            disk_files = _shared_disk_paths(definition.description)
        source = next((d for n, d in sorted(definition.documents.items()) if n.endswith(".vmx") and d), None)
        if source is not None:
            text = vmx.rewrite(source.decode("utf-8", "replace"), name, disk_files, definition.new_identity)
        else:
            text = vmx.from_description(definition.description, name, disk_files)
        nvram = next((d for n, d in sorted(definition.documents.items()) if n.endswith(".nvram")), None)
        if nvram is not None:
            files[f"{name}.nvram"] = nvram
        files[f"{name}.vmx"] = text.encode()
        return files

    def register_vm(self, definition: VMDefinition, start: bool = False) -> RegisterResult:
        conn = self.conn
        ds = self._datastore()
        dc = conn.datacenter_of(ds)
        name = component(definition.name, "VM name")  # a folder and file names on the datastore
        vmx_path = f"[{ds.name}] {name}/{name}.vmx"
        tmp = Path(tempfile.mkdtemp(prefix="hotvm-register-"))
        try:
            files = self._files(definition, tmp)
            sums = {f: _sha256(data) for f, data in sorted(files.items())}
            sidecar = json.dumps({"source_vm": definition.source_vm, "files": sums}, indent=2).encode()
            existing = conn.find_vm(name)
            if existing is not None and existing.config.files.vmPathName != vmx_path:
                raise HypervisorError(
                    f"vSphere host '{self.host.name}' already has another VM named '{name}' "
                    f"(at {existing.config.files.vmPathName})",
                    "register under another name (--name) or remove that VM first",
                )
            registered = conn.read(f"[{ds.name}] {name}/{SIDECAR}", dc) if existing is not None else None
            if existing is not None and registered is None:
                # same path but no sidecar: a VM hotvm did not register (another site's own VM of that name)
                raise HypervisorError(
                    f"vSphere host '{self.host.name}' already has a VM named '{name}' at {vmx_path} "
                    "that hotvm did not register",
                    "register under another name (--name) or remove that VM first",
                )
            if registered == sidecar:
                started = self._start(existing, name) if start else False
                log.info("VM '%s' on '%s' is registered and identical: unchanged", name, self.host.name)
                return RegisterResult(self.host.name, name, "unchanged", started, vmx_path)
            if existing is not None:
                if existing.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
                    raise HypervisorError(
                        f"VM '{name}' on '{self.host.name}' differs from the backup but is powered on",
                        "power it off (a standby copy must stay off) and rerun",
                    )
                existing.UnregisterVM()  # keeps its files; registered again below with the new ones
            else:  # claimed first: a run that dies before the full sidecar below is resumed, not refused
                claim = json.dumps({"source_vm": definition.source_vm, "files": {}}).encode()
                conn.upload(claim, f"[{ds.name}] {name}/{SIDECAR}", dc)
            for fname, data in files.items():
                conn.upload(data, f"[{ds.name}] {name}/{fname}", dc)
            if conn.read(f"[{ds.name}] {name}/vmware.log", dc) is None:
                # vcsim 0.24's RegisterVM opens vmware.log and fails without it; ESX appends to it anyway
                conn.upload(b"", f"[{ds.name}] {name}/vmware.log", dc)
            host, pool = self._compute(ds)
            folder = self._folder(dc)
            new = conn.wait(
                folder.RegisterVM_Task(path=vmx_path, name=name, asTemplate=False, pool=pool, host=host),
                f"registering {vmx_path} on '{self.host.name}'", self.host.job_timeout_s,
            ).result  # fmt: skip
            conn.upload(sidecar, f"[{ds.name}] {name}/{SIDECAR}", dc)  # last: only a complete copy matches
            action = "updated" if existing is not None else "created"
            log.info("VM '%s' %s on '%s' at %s", name, action, self.host.name, vmx_path)
            started = self._start(new, name) if start else False
            return RegisterResult(self.host.name, name, action, started, vmx_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _start(self, vm: vim.VirtualMachine, name: str) -> bool:
        from hotvm.hypervisors.vsphere_question import answer_single_choice

        if vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOn:
            return True
        self.conn.wait(vm.PowerOnVM_Task(), f"powering on VM '{name}'", self.host.job_timeout_s,
                       between=lambda: answer_single_choice(vm, name))  # fmt: skip
        return True
