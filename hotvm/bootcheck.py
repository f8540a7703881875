"""Boot a restored VM in isolation and time it: the restore test the seed insists on ("test test test").

The copy runs with no network and `snapshot=on` disks (their temporary overlays in a private directory),
so checking a restore never changes it; the time from launch to the ready pattern on the serial console
is the measured recovery time. Both `restore --boot-check` and the demo guest's `boot_check` use this.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.config import BootCheckSpec
from hotvm.formats.manifest import Manifest
from hotvm.formats.restore import RestoredDisk

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class BootCheckResult:
    ok: bool
    seconds: float
    detail: str
    log: str
    accel: str = "tcg"

    def as_dict(self) -> dict:
        return asdict(self)


def default_accel() -> str:
    """TCG unless told otherwise: on nested machines KVM may initialise yet never boot Linux."""
    return os.environ.get("HOTVM_ACCEL", "tcg")


def boot_command(spec: BootCheckSpec, disks: list[tuple[str, str]], serial: Path, accel: str) -> list[str]:
    args = [
        QEMU,
        "-accel",
        accel,
        "-M",
        "pc",
        "-m",
        str(spec.memory_mb),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{serial}",
    ]
    if spec.kernel:
        args += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd:
            args += ["-initrd", str(spec.initrd)]
    for index, (path, fmt) in enumerate(disks):
        boot = ",bootindex=0" if index == 0 and not spec.kernel else ""  # -kernel takes bootindex 0 itself
        escaped = path.replace(",", ",,")
        args += [
            "-drive",
            f"file={escaped},format={fmt},if=none,id=d{index},snapshot=on",
            "-device",
            f"virtio-blk-pci,drive=d{index}" + boot,
        ]
    return args


def boot_disks(
    spec: BootCheckSpec, disks: list[tuple[str, str]], serial: Path, accel: str | None = None
) -> BootCheckResult:
    """Boot `disks` ([(path, format)], first one boots) and wait for `spec.ready_pattern` on the console."""
    accel = accel or default_accel()
    pattern = re.compile(spec.ready_pattern)
    with tempfile.TemporaryDirectory(prefix="hotvm-boot-") as tmp:
        proc = subprocess.Popen(
            boot_command(spec, disks, serial, accel),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=child_env(TMPDIR=tmp),  # TMPDIR: where snapshot=on puts its overlays; no hotvm secrets
        )
        started = time.monotonic()

        def result(ok: bool, detail: str, text: str) -> BootCheckResult:
            return BootCheckResult(ok, round(time.monotonic() - started, 3), detail, text[-4000:], accel)

        try:
            while True:
                running = proc.poll() is None
                text = serial.read_text(errors="replace") if serial.exists() else ""
                if pattern.search(text):
                    return result(True, f"'{spec.ready_pattern}' seen on the serial console", text)
                if not running:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    return result(False, f"QEMU exited with {proc.returncode}: {err[:500]}", text)
                if time.monotonic() - started > spec.timeout_s:
                    return result(
                        False, f"'{spec.ready_pattern}' not seen within {spec.timeout_s:.0f} s", text
                    )
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def boot_check_restored(manifest: Manifest, disks: list[RestoredDisk], dest: Path) -> BootCheckResult:
    spec = manifest.boot_check or BootCheckSpec()
    return boot_disks(spec, [(d.path, d.format) for d in disks], dest / "boot-check.log")
