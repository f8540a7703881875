"""Config sync to a standby host and restore --to-host, QEMU -> QEMU, on the real demo guest.

The "hosts" are QEMU hosts of this machine with their own vm_dir; what gets registered is a launch spec
built from the backup alone, and the standby copy is booted for real (serial console ready pattern).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from helpers import hotvm_json

from hotvm.config_file import load_config
from hotvm.guest import create_vm, list_vms, start_vm, stop_vm, vm_config_entry, wait_ready
from hotvm.hypervisors.qemu_host import LAUNCH_NAME, SPEC_NAME, QemuHost
from hotvm.standby import sync_config

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs QEMU"),
    pytest.mark.timeout(300),
]
READY = re.compile(r"HOTVM-READY last=(\d+)[\s\S]*?HOTVM-HEARTBEAT seq=\d+")


def _kill_qemus_under(root: Path) -> None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(root).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running demo guest 'sv' on host src; empty QEMU hosts 'standby' (its standby) and 'other'."""
    root = tmp_path_factory.mktemp("sby")
    vms = root / "vms"
    create_vm("sv", data_size="16M", state_dir=vms)
    start_vm("sv", state_dir=vms)
    try:
        wait_ready("sv", 90, state_dir=vms)
        entry = vm_config_entry("sv", vms) | {"standby_host": "standby"}
        config = {
            "hosts": [
                {"name": "src", "vms": [entry]},
                {"name": "standby", "vm_dir": str(root / "standby")},
                {"name": "other", "vm_dir": str(root / "other")},
            ],
            "targets": [{"name": "nas", "url": f"file://{root}/target"}],
        }
        (root / "hotvm.yaml").write_text(yaml.safe_dump(config))
        yield root, str(root / "hotvm.yaml"), vms
    finally:
        for vm in list_vms(vms):
            stop_vm(vm.name, vms, timeout=5)
        _kill_qemus_under(root)


def spec_of(root: Path, host: str, name: str) -> dict:
    return json.loads((root / host / name / SPEC_NAME).read_text())


def wait_serial(path: Path, timeout: float = 90) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if match := READY.search(text):
            return match
        time.sleep(0.3)
    raise AssertionError(f"the copy did not come up:\n{text[-600:]}")


def test_sync_registers_is_idempotent_follows_config_changes_and_boots(prefect_server, lab):
    from flows.backup_vm import backup_vm

    root, config, vms = lab
    first = backup_vm(vm="sv", config=config)

    result = sync_config(config, "sv")
    assert (result["action"], result["host"], result["started"]) == ("created", "standby", False)
    spec = spec_of(root, "standby", "sv")
    launch = root / "standby" / "sv" / LAUNCH_NAME
    assert result["location"] == str(launch) and launch.stat().st_mode & 0o111
    argv = shlex.split(launch.read_text().split("exec ", 1)[1].replace("\\\n", " "))
    assert argv == spec["command"] and spec["new_identity"] is False
    assert f"unix:{root}/standby/sv/qmp.sock,server=on,wait=off" in argv  # its own QMP socket
    assert spec["disks"] == {"data": str(vms / "sv" / "data.qcow2")}  # no disks copied: shared storage
    assert (root / "standby" / "sv" / "config" / str(vms / "sv" / LAUNCH_NAME).lstrip("/")).exists()
    assert QemuHost(load_config(config).find_host("standby")).list_vms() == ["sv"]

    # a rerun (the deployment's flow, through the CLI, over every VM with a standby) changes nothing
    mtime = launch.stat().st_mtime_ns
    rows = hotvm_json("sync-config", "-c", config)
    assert [(r["vm"], r["action"]) for r in rows] == [("sv", "unchanged")]
    assert launch.stat().st_mtime_ns == mtime

    # the VM's config changes, a new backup: the standby is updated
    source_launch = vms / "sv" / LAUNCH_NAME
    source_launch.write_text(source_launch.read_text() + "# moved to rack 2\n")
    second = backup_vm(vm="sv", config=config)
    assert second["backup_id"] != first["backup_id"]
    assert sync_config(config, "sv")["action"] == "updated"
    copied = root / "standby" / "sv" / "config" / str(source_launch).lstrip("/")
    assert copied.read_text().endswith("# moved to rack 2\n")

    # with the latest disks, started: the standby copy boots from its own restored disk
    host = QemuHost(load_config(config).find_host("standby"))
    try:
        result = sync_config(config, "sv", with_disks=True, start=True)
        assert (result["action"], result["started"]) == ("updated", True)
        disk = Path(result["disks"]["data"])
        assert disk.parent == root / "standby" / "sv" / f"disks-{second['backup_id']}"
        assert host.running("sv")
        assert int(wait_serial(root / "standby" / "sv" / "serial.log").group(1)) > 0  # found its data
        assert sync_config(config, "sv", with_disks=True)["action"] == "unchanged"
    finally:
        host.stop("sv")
    assert not host.running("sv")


def test_restore_to_host_with_a_new_name_gets_a_new_identity(prefect_server, lab):
    root, config, vms = lab
    if not list((root / "target").glob("vms/sv/*/manifest.json")):
        from flows.backup_vm import backup_vm

        backup_vm(vm="sv", config=config)
    result = hotvm_json("restore", "sv", "--to-host", "other", "--name", "sv-copy", "-c", config)
    reg = result["registered"]
    assert (reg["host"], reg["name"], reg["action"], reg["new_identity"]) == (
        "other",
        "sv-copy",
        "created",
        True,
    )
    spec = spec_of(root, "other", "sv-copy")
    assert (
        spec["uuid"]
        and "-uuid" in spec["command"]
        and spec["command"][spec["command"].index("-name") + 1] == "sv-copy"
    )
    assert Path(spec["disks"]["data"]).is_relative_to(root / "other" / "sv-copy")
    assert Path(spec["disks"]["data"]).exists()
    # the copy's sockets, logs and pid file are its own, never the original's
    assert str(vms / "sv" / "qmp") not in " ".join(spec["command"])


def test_launch_spec_moves_disks_sockets_and_identity(tmp_path):
    """A hand-written launch script (the VM's config file) registered under a new name on a QEMU host."""
    import subprocess

    from hotvm.config import HostConfig
    from hotvm.hypervisors.base import VMDefinition

    src = tmp_path / "src"
    src.mkdir()
    for name, fmt in (("sys.raw", "raw"), ("restored-sys.qcow2", "qcow2"), ("data.qcow2", "qcow2")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / name), "1M"], check=True)
    script = f"""#!/bin/sh
# web01, rack 1
qemu-system-x86_64 -name web01 -uuid 6f1f0bde-3c0a-4c9e-8d3c-0a1b2c3d4e5f -m 512 \\
  -drive file={tmp_path}/sys.raw,format=raw,if=virtio,id=sys \\
  -drive file={tmp_path}/data.qcow2,format=qcow2,if=virtio,id=data \\
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 \\
  -chardev socket,path={src}/qga.sock,server=on,wait=off,id=qga0 -device virtio-serial \\
  -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \\
  -qmp unix:{src}/qmp.sock,server=on,wait=off -serial file:{src}/console.log
"""
    disks = [
        {"device": "sys", "path": str(tmp_path / "sys.raw")},
        {"device": "data", "path": str(tmp_path / "data.qcow2")},
    ]
    definition = VMDefinition(
        name="web01-copy", source_vm="web01", source_driver="qemu", documents={},
        files={f"{src}/start.sh": script.encode()}, description={"disks": disks},
        disks={"sys": tmp_path / "restored-sys.qcow2"}, new_identity=True,
    )  # fmt: skip
    host = QemuHost(HostConfig(name="h2", vm_dir=tmp_path / "h2"))
    result = host.register_vm(definition)
    spec = spec_of(tmp_path, "h2", "web01-copy")
    cmd, home = " ".join(spec["command"]), tmp_path / "h2" / "web01-copy"
    assert f"file={tmp_path}/restored-sys.qcow2,if=virtio,id=sys,format=qcow2" in cmd  # restored disk
    assert f"file={tmp_path}/data.qcow2,format=qcow2" in cmd  # not restored: the same (shared) file
    assert "52:54:00:12:34:56" not in cmd and "6f1f0bde" not in cmd and spec["uuid"] in cmd
    assert f"unix:{home}/qmp.sock" in cmd and f"file:{home}/console.log" in cmd
    assert spec["guest_agent"] == f"{home}/qga.sock"
    assert (result.action, host.register_vm(definition).action) == ("created", "unchanged")  # stable identity

    same = VMDefinition(**{**definition.__dict__, "name": "web01", "new_identity": False})
    QemuHost(HostConfig(name="h3", vm_dir=tmp_path / "h3")).register_vm(same)
    cmd = " ".join(spec_of(tmp_path, "h3", "web01")["command"])
    assert "mac=52:54:00:12:34:56" in cmd and "-uuid 6f1f0bde-3c0a-4c9e-8d3c-0a1b2c3d4e5f" in cmd
