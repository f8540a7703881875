"""A real libvirtd for the tests, and small TCG domains that boot the demo guest (hotvm/guest).

libvirt runs QEMU as libvirt-qemu and chowns the images it uses to that user (dynamic_ownership), so every
file a domain uses lives in a directory that user can traverse (pytest's tmp dirs are 0700): what a real
user does too (/var/lib/libvirt/images). No /etc file is changed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

URI = "qemu:///system"
SOCKETS = {"libvirtd": Path("/run/libvirt/libvirt-sock"), "virtlogd": Path("/run/libvirt/virtlogd-sock")}
STATIC_OFFSET, STATIC_BYTES = 4 << 20, 4 << 20  # beyond the guest's ring (first MiB): never written by it
READY = re.compile(r"HOTVM-READY last=(\d+)")
HEARTBEAT = re.compile(r"HOTVM-HEARTBEAT seq=(\d+)")


def _virsh_ok() -> bool:
    proc = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30)
    return proc.returncode == 0


@contextlib.contextmanager
def running_libvirtd() -> Iterator[None]:
    """libvirtd (+ virtlogd) on qemu:///system: reuses running daemons; those it starts run in the
    foreground as its children (so they are reaped) and are stopped again at the end."""
    if not shutil.which("libvirtd"):
        pytest.skip("libvirtd is not installed (libvirt-daemon-system)")
    started: list[subprocess.Popen] = []
    try:
        if not _virsh_ok():
            if os.geteuid() != 0:
                pytest.skip("libvirtd is not running and starting qemu:///system needs root")
            for daemon in ("virtlogd", "libvirtd"):
                if not SOCKETS[daemon].exists():  # a daemon removes its socket when it exits
                    started.append(
                        subprocess.Popen(
                            [daemon],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            start_new_session=True,
                        )  # fmt: skip
                    )
            deadline = time.monotonic() + 20
            while not _virsh_ok():
                if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                    pytest.skip("libvirtd did not start: qemu:///system does not answer within 20 s")
                time.sleep(0.2)
        yield
    finally:
        for proc in reversed(started):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def shared_dir(prefix: str = "hotvm-libvirt-") -> Path:
    """A directory libvirt's qemu user can traverse (0755 under /var/tmp)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class Disk:
    target: str
    path: Path | None
    fmt: str = "qcow2"
    size: str = "16M"
    device: str = "disk"
    bus: str = "virtio"
    extra: str = ""
    """Child elements (<readonly/>, <shareable/>, <transient/>)."""
    attrs: str = ""
    """Extra <disk> attributes (snapshot='no')."""


@dataclass
class GuestDomain:
    name: str
    dir: Path
    serial_log: Path
    disks: list[Disk] = field(default_factory=list)
    mac: str = "52:54:00:aa:bb:01"
    append: str = ""
    agent: bool = False
    """A virtio channel for qemu-ga (org.qemu.guest_agent.0): libvirt connects it itself."""
    """Extra kernel command line (hotvm.interval=0.05: the guest writes 20 records a second)."""

    @property
    def data(self) -> Path:
        assert self.disks[0].path is not None
        return self.disks[0].path


def domain_xml(dom: GuestDomain, kernel: Path, initrd: Path) -> str:
    disks = []
    for d in dom.disks:
        source = f"<source file={quoteattr(str(d.path))}/>" if d.path else ""
        driver = f"<driver name='qemu' type='{d.fmt}'/>" if d.path else "<driver name='qemu'/>"
        disks.append(
            f"<disk type='file' device='{d.device}' {d.attrs}>{driver}{source}"
            f"<target dev='{d.target}' bus='{d.bus}'/>{d.extra}</disk>"
        )
    agent = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    agent = agent if dom.agent else ""
    return f"""<domain type='qemu'>
  <name>{dom.name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 {dom.append}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    {"".join(disks)}
    <interface type='user'><mac address='{dom.mac}'/><model type='virtio'/></interface>
    <serial type='file'><source path={quoteattr(str(dom.serial_log))}/><target port='0'/></serial>
    {agent}<memballoon model='none'/>
  </devices>
</domain>
"""


def make_images(dom: GuestDomain) -> bytes:
    """Create the disk images, with random static data at STATIC_OFFSET of the data disk (returned)."""
    for d in dom.disks:
        if d.path is not None:
            subprocess.run(["qemu-img", "create", "-q", "-f", d.fmt, str(d.path), d.size], check=True)
    payload = os.urandom(STATIC_BYTES)
    blob = dom.dir / "static.bin"
    blob.write_bytes(payload)
    subprocess.run(
        ["qemu-io", "-f", dom.disks[0].fmt, "-c", f"write -s {blob} {STATIC_OFFSET} {STATIC_BYTES}",
         str(dom.data)],
        check=True, capture_output=True,
    )  # fmt: skip
    blob.unlink()
    return payload


def wait_serial(log: Path, pattern: re.Pattern[str], timeout: float, start: int = 0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        match = pattern.search(text, start)
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern.pattern!r} in {log} within {timeout}s; tail: {text[-400:]!r}")
        time.sleep(0.1)


def last_heartbeat(log: Path) -> int:
    seqs = HEARTBEAT.findall(log.read_bytes().decode(errors="replace"))
    return int(seqs[-1]) if seqs else 0


def wait_beat_past(log: Path, seq: int, timeout: float = 60) -> int:
    """The guest's newest heartbeat once one is past `seq`: it wrote on (waited for, not slept on: a loaded
    machine slows a TCG guest down)."""
    deadline = time.monotonic() + timeout
    while (last := last_heartbeat(log)) <= seq:
        assert time.monotonic() < deadline, f"the guest wrote nothing past record {seq} in {timeout} s"
        time.sleep(0.1)
    return last


def wait_records(log: Path, count: int, timeout: float = 60) -> None:
    """Returns once the guest has written `count` more ring records after this call began: those after the
    first heartbeat printed since (its own record may have been written just before the call)."""
    first = wait_beat_past(log, last_heartbeat(log), timeout)
    wait_beat_past(log, first + count - 1, timeout)


def destroy_and_undefine(conn, name: str) -> None:
    """Remove a test domain whatever state it is in (never touches domains the tests did not make)."""
    import libvirt

    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )


def unique_name(prefix: str = "hotvm-lv") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def raw_bytes(image: str | Path, fmt: str) -> bytes:
    """The guest-visible bytes of an image (-U: a frozen image QEMU holds open read-only is fine)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "check.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True
        )
        return raw.read_bytes()


def read_static(image: Path, fmt: str) -> bytes:
    return raw_bytes(image, fmt)[STATIC_OFFSET : STATIC_OFFSET + STATIC_BYTES]
