"""Boot a restored VM in isolation and time it: the restore test the seed insists on ("test test test").

The copy runs with no network and `snapshot=on` disks, so checking a restore never changes it, and the
time from launch to the ready pattern on the serial console is the measured recovery time.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hotvm.formats.restore import RestoredDisk
from hotvm.models import BootCheckSpec, Manifest

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class BootCheckResult:
    ok: bool
    seconds: float
    detail: str
    log: str

    def as_dict(self) -> dict:
        return asdict(self)


def accel() -> str:
    """TCG unless told otherwise: on nested machines KVM initialises but Linux may hang booting under it."""
    return os.environ.get("HOTVM_ACCEL", "tcg")


def boot_command(spec: BootCheckSpec, disks: list[RestoredDisk], serial: Path, qmp: Path) -> list[str]:
    args = [
        QEMU,
        "-accel",
        accel(),
        "-M",
        "q35",
        "-m",
        str(spec.memory_mb),
        "-nodefaults",
        "-display",
        "none",
        "-nic",
        "none",
        "-serial",
        f"file:{serial}",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    if spec.kernel:
        args += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd:
            args += ["-initrd", str(spec.initrd)]
    for index, disk in enumerate(disks):
        args += [
            "-drive",
            f"file={disk.path},format={disk.format},if=none,id=d{index},snapshot=on",
            "-device",
            f"virtio-blk-pci,drive=d{index}" + (",bootindex=0" if index == 0 else ""),
        ]
    return args


def boot_check_restored(manifest: Manifest, disks: list[RestoredDisk], dest: Path) -> BootCheckResult:
    spec = manifest.boot_check or BootCheckSpec()
    serial = dest / "boot-check.log"
    pattern = re.compile(spec.ready_pattern)
    with tempfile.TemporaryDirectory(prefix="hotvm-boot-") as tmp:
        proc = subprocess.Popen(
            boot_command(spec, disks, serial, Path(tmp) / "qmp.sock"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        started = time.monotonic()
        try:
            while True:
                text = serial.read_text(errors="replace") if serial.exists() else ""
                if pattern.search(text):
                    return BootCheckResult(
                        True,
                        round(time.monotonic() - started, 2),
                        f"'{spec.ready_pattern}' seen on the serial console",
                        text[-2000:],
                    )
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return BootCheckResult(
                        False,
                        round(time.monotonic() - started, 2),
                        f"QEMU exited with {proc.returncode}: {err.strip()[:500]}",
                        text[-2000:],
                    )
                if time.monotonic() - started > spec.timeout_s:
                    return BootCheckResult(
                        False,
                        round(time.monotonic() - started, 2),
                        f"'{spec.ready_pattern}' not seen within {spec.timeout_s:.0f} s",
                        text[-2000:],
                    )
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
