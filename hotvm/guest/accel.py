"""Choose KVM or TCG for the demo guest, by evidence rather than by the existence of /dev/kvm.

On nested or sandboxed hosts /dev/kvm can open fine yet not run a stock Linux guest: here it is kvm-pvm
(software "pagetable virtual machine"), which runs a non-PVM kernel through its instruction emulator —
slower than TCG and it dies on `lock cmpxchg16b` ("KVM internal error ... emulation failure"). So KVM is
used only after a throwaway guest reached HOTVM-READY under it, and the verdict is cached per machine in
the state dir: after the first start, TCG (or KVM) is chosen without a probe. HOTVM_ACCEL forces one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.guest.artifacts import ensure_guest_files
from hotvm.guest.errors import GuestError
from hotvm.guest.qemu import guest_command, qemu_version, read_text, tail, wait_for

ACCEL_ENV = "HOTVM_ACCEL"
CACHE_FILE = "accel.json"
KVM_PROBE_TIMEOUT = 10.0  # TCG boots in ~2.5 s: a KVM that needs longer is not worth having
_KVM_GET_API_VERSION = 0xAE00
_READY = re.compile(r"HOTVM-READY last=(\d+)")


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str
    cached: bool = False


def choose_accel(state_dir: Path, forced: str | None = None) -> AccelChoice:
    """`forced` (or $HOTVM_ACCEL), else the cached verdict for this machine, else a probe."""
    forced = forced or os.environ.get(ACCEL_ENV) or None
    if forced:
        if forced not in ("tcg", "kvm"):
            raise GuestError(f"{ACCEL_ENV}={forced!r} is not an accelerator", "use tcg or kvm")
        return AccelChoice(forced, "forced")
    usable, why = kvm_usable()
    if not usable:
        return AccelChoice("tcg", why)
    machine = _machine_key()
    cache = state_dir / CACHE_FILE
    try:
        saved = json.loads(cache.read_text())
        if saved.get("machine") == machine:
            return AccelChoice(saved["accel"], saved["reason"], cached=True)
    except (OSError, ValueError, KeyError):
        pass
    ok, why = probe_kvm(state_dir)
    choice = AccelChoice("kvm" if ok else "tcg", why)
    state_dir.mkdir(parents=True, exist_ok=True)
    record = {**asdict(choice), "machine": machine, "checked": dt.datetime.now(dt.UTC).isoformat()}
    cache.write_text(json.dumps(record, indent=2) + "\n")
    return choice


def kvm_usable() -> tuple[bool, str]:
    """Can this process use /dev/kvm at all, and is it a KVM that runs unmodified guests?"""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm not usable: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"/dev/kvm does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"/dev/kvm has KVM API version {version}, QEMU needs 12"
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists() and not any((modules / m).exists() for m in ("kvm_intel", "kvm_amd")):
        return False, "KVM here is kvm-pvm (software virtualization): it cannot run a stock Linux kernel"
    return True, "/dev/kvm usable"


def probe_kvm(state_dir: Path, timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot a throwaway guest (scratch disk) under KVM; (True, ...) only if it printed HOTVM-READY."""
    files = ensure_guest_files(state_dir)
    with tempfile.TemporaryDirectory(prefix="hotvm-kvm-probe-") as tmp:
        tmpdir = Path(tmp)
        disk, serial, log = tmpdir / "probe.raw", tmpdir / "serial.log", tmpdir / "qemu.log"
        with disk.open("wb") as fh:
            fh.truncate(2 << 20)
        cmd = guest_command(files.kernel, files.initramfs, serial, "kvm") + [
            "-drive",
            f"file={disk},format=raw,if=virtio",
        ]
        start = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=child_env(),
            )
        try:
            alive = lambda: proc.poll() is None and "KVM internal error" not in read_text(log)  # noqa: E731
            ready = wait_for(serial, _READY, timeout, alive)
        finally:
            proc.kill()
            proc.wait()
        seconds = time.monotonic() - start
        if ready:
            return True, f"a test guest reached HOTVM-READY under KVM in {seconds:.1f} s"
        last = tail(log, 3).replace("\n", " | ") or tail(serial, 1) or "no output"
        return False, f"a test guest did not reach HOTVM-READY under KVM in {seconds:.1f} s ({last[:200]})"


def _machine_key() -> dict[str, str]:
    """What the verdict depends on: this host, its kernel (KVM), QEMU and the guest kernel."""
    guest = sorted(p.name for p in Path("/boot").glob("vmlinuz-*"))
    return {
        "host": socket.gethostname(),
        "host_kernel": os.uname().release,
        "qemu": qemu_version(),
        "qemu_path": shutil.which("qemu-system-x86_64") or "",
        "guest_kernels": ",".join(guest),
    }
