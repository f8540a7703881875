"""Start a bare QEMU (TCG, no guest OS) with disks, for tests that need a real VM's block layer.

Block jobs, overlays and guest-like writes (HMP `qemu-io`) all work without a kernel. The VM gets two QMP
sockets: `qmp_path` for the code under test and a private one for the test's own `hmp()`/`qemu_io()` calls,
because a QMP socket serves one client at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qemu.qmp.legacy import QEMUMonitorProtocol

from hotvm.hypervisors.base import OVERLAY_MARKER

QEMU = "qemu-system-x86_64"
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DiskSpec:
    """One disk of the test VM.

    style "blockdev": `-blockdev file+format` + `-device ...,drive=<id>-fmt,id=<id>` (device name = qdev id);
    style "drive": `-drive ...,if=none,id=<id>` + `-device ...,drive=<id>` (device name = drive id).
    bus "cdrom" with path None is an empty CD-ROM drive. `blockdev` overrides the whole -blockdev JSON
    (its top node must be named `<id>-fmt`), e.g. to put blkdebug under an image.
    """

    id: str
    path: Path | None = None
    format: str = "qcow2"
    bus: Literal["virtio", "ide", "scsi", "cdrom"] = "virtio"
    style: Literal["blockdev", "drive"] = "blockdev"
    read_only: bool = False
    snapshot: bool = False
    blockdev: dict | None = None

    @property
    def qemu_io_target(self) -> str:
        """How HMP qemu-io names this disk's BlockBackend."""
        if self.style == "drive":
            return self.id
        if self.bus == "virtio":
            return f"-d /machine/peripheral/{self.id}/virtio-backend"
        return f"-d {self.id}"


@dataclass
class RunningQemu:
    proc: subprocess.Popen
    qmp_path: Path
    ctl_path: Path
    log_path: Path
    disks: list[DiskSpec] = field(default_factory=list)

    def qmp(self, cmd: str, **args: object) -> object:
        """One QMP command on the private control socket (connect per call: never blocks the other one)."""
        mon = QEMUMonitorProtocol(str(self.ctl_path))
        mon.connect()
        try:
            return mon.cmd(cmd, **args)
        finally:
            mon.close()

    def hmp(self, command: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": command}))

    def qemu_io(self, device: str, cmd: str) -> None:
        """Guest-like I/O on a disk through its BlockBackend (output goes to QEMU's stdout, i.e. the log)."""
        spec = next((d for d in self.disks if d.id == device), None)
        target = spec.qemu_io_target if spec else device
        out = self.hmp(f'qemu-io {target} "{cmd}"')
        if out.strip():
            raise RuntimeError(f"qemu-io {target} {cmd!r}: {out.strip()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except Exception:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _disk_args(index: int, spec: DiskSpec, scsi: str) -> list[str]:
    device = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd", "cdrom": "ide-cd"}[spec.bus]
    bus = {"ide": f",bus=ide.{index}", "cdrom": f",bus=ide.{index}", "scsi": f",bus={scsi}.0"}.get(
        spec.bus, ""
    )
    if spec.style == "drive":
        opts = [f"if=none,id={spec.id}"]
        if spec.path is not None:
            opts.append(f"file={spec.path},format={spec.format}")
        if spec.bus == "cdrom":
            opts.append("media=cdrom")
        if spec.read_only:
            opts.append("readonly=on")
        if spec.snapshot:
            opts.append("snapshot=on")
        return ["-drive", ",".join(opts), "-device", f"{device},drive={spec.id}{bus}"]
    node = spec.blockdev or {
        "driver": spec.format,
        "node-name": f"{spec.id}-fmt",
        "read-only": spec.read_only,
        "file": {"driver": "file", "filename": str(spec.path), "node-name": f"{spec.id}-file"},
    }
    return ["-blockdev", json.dumps(node), "-device", f"{device},drive={spec.id}-fmt,id={spec.id}{bus}"]


def start_qemu(tmp_path: Path, disks: list[DiskSpec], extra_args: list[str] | None = None) -> RunningQemu:
    """Start QEMU under TCG with `disks`; returns once both QMP sockets accept connections."""
    qmp_path, ctl_path, log_path = tmp_path / "vm.qmp", tmp_path / "ctl.qmp", tmp_path / "qemu.log"
    ide = sum(1 for d in disks if d.bus in ("ide", "cdrom"))
    if ide > 6:
        raise ValueError("q35 has 6 AHCI ports")
    args = [QEMU, "-accel", "tcg", "-M", "q35", "-m", "64", "-nodefaults", "-display", "none", "-nic", "none"]
    args += ["-qmp", f"unix:{qmp_path},server=on,wait=off", "-qmp", f"unix:{ctl_path},server=on,wait=off"]
    if any(d.bus == "scsi" for d in disks):
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    ide_index = 0
    for spec in disks:
        args += _disk_args(ide_index, spec, "scsi0")
        ide_index += spec.bus in ("ide", "cdrom")
    args += extra_args or []
    log = log_path.open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    vm = RunningQemu(proc, qmp_path, ctl_path, log_path, list(disks))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {proc.returncode}: {vm.log()}")
        if qmp_path.exists() and ctl_path.exists():
            try:
                vm.qmp("query-status")
                return vm
            except Exception:
                pass
        time.sleep(0.05)
    vm.stop()
    raise RuntimeError(f"QEMU did not open its QMP sockets within {START_TIMEOUT_S}s: {vm.log()}")


def qemu_img(*args: str) -> str:
    """Run qemu-img, return stdout, raise with stderr on failure."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def read_pattern_ok(path: Path, fmt: str, pattern: int, offset: int, length: int) -> bool:
    """True if the image (QEMU stopped, or a frozen read-only layer) holds `pattern` over the range."""
    proc = subprocess.run(
        ["qemu-io", "-r", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    return (
        proc.returncode == 0 and f"read {length}/{length} bytes" in out and "verification failed" not in out
    )


def overlay_files(root: Path) -> list[Path]:
    """hotvm REDO overlays left anywhere below `root` (a clean run leaves none)."""
    return [p for p in root.rglob("*") if OVERLAY_MARKER in p.name]


def random_raw(path: Path, size: int, data_bytes: int) -> Path:
    """A raw image of `size` bytes whose first `data_bytes` are random (incompressible, no dedup)."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(os.urandom(data_bytes))
    return path
