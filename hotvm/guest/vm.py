"""Demo VMs: create, start, stop and list tiny real Linux guests, and boot-check restored disks.

Each VM lives in `<state_dir>/<name>/` (default `.hotvm/vms`, or $HOTVM_STATE_DIR): vm.json (what it is),
kernel + initramfs (hard links into the shared cache), the data disk, and while running: qemu.pid, two QMP
sockets (qmp.sock for hotvm, qmp2.sock for tests and humans), serial.log (the guest console), qemu.log
(QEMU's own messages) and launch.sh — the exact command line, which is the VM's "VMX" that backups keep.
QEMU runs daemonized, so VMs outlive the CLI that started them and never linger as zombies of a
long-running worker.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hotvm.bootcheck import boot_disks
from hotvm.child_env import child_env
from hotvm.config import BootCheckSpec
from hotvm.errors import HotvmError
from hotvm.guest.accel import choose_accel
from hotvm.guest.artifacts import GuestFiles, ensure_guest_files
from hotvm.guest.disk import image_info
from hotvm.guest.errors import (
    BootTimeout,
    GuestError,
    VMAlreadyRunning,
    VMExists,
    VMNotFound,
    VMNotRunning,
)
from hotvm.guest.initramfs import AGENT_INIT, AGENT_SH, QEMU_GA, build_initramfs, find_kernel
from hotvm.guest.qemu import (
    BASE_APPEND,
    MEMORY_MB,
    check_socket_path,
    escape_opt,
    guest_command,
    pid_alive,
    qmp_args,
    read_pid,
    read_text,
    render_script,
    tail,
    terminate,
    wait_exit,
    wait_for,
)
from hotvm.hypervisors.qmp import Monitor

STATE_ENV = "HOTVM_STATE_DIR"
DEFAULT_STATE_DIR = Path(".hotvm/vms")
DEVICE_ID = "data"  # qdev id of the data disk: what QMP and backup manifests call it
NODE_NAME = "data-disk"  # format node (qcow2/raw); its protocol node is "data-file"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_READY = re.compile(r"HOTVM-READY last=(\d+)")
_HEARTBEAT = re.compile(r"HOTVM-HEARTBEAT seq=(\d+)")
_MIN_DISK = 2 << 20  # the ring takes the first MiB
FS_DISK = "fs.raw"  # agent VMs: the ext4 disk (qdev id "fs") the guest mounts at /mnt/fs
AGENT_PORT = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class VMStatus:
    name: str
    running: bool
    pid: int | None
    qmp: Path
    qmp2: Path
    disk: Path
    fmt: str
    dir: Path
    serial_log: Path
    launch_script: Path
    accel: str | None
    """Accelerator of the current (or last) run."""
    guest_agent: Path | None = None
    """VMs created with agent=True: the qemu-ga socket (the guest also mounts its ext4 disk `fs`)."""


@dataclass(frozen=True)
class BootCheckResult:
    seconds: float
    """Launch to HOTVM-READY: the measured recovery time (0 ... timeout when not ready)."""
    ready: bool
    """The guest printed HOTVM-READY and then at least one heartbeat (it writes again)."""
    last_seq: int | None
    """Newest complete record the guest found on the disk (None if it never got ready)."""
    serial_tail: str
    heartbeat_seq: int | None = None
    """First heartbeat after READY: the restored guest writes again."""
    accel: str = ""


def state_root(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Absolute (QEMU daemonizes into /) state dir: argument, $HOTVM_STATE_DIR or .hotvm/vms."""
    raw = state_dir or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
    return Path(raw).expanduser().resolve()


def create_vm(
    name: str,
    data_size: int | str = "64M",
    fmt: str = "qcow2",
    state_dir: str | os.PathLike[str] | None = None,
    agent: bool = False,
    fs_size: int | str = "16M",
) -> VMStatus:
    """Make the VM's directory: kernel, initramfs and an empty data disk (the guest fills the ring).

    agent: also Debian's qemu-ga in the initramfs on a virtio port (socket qga.sock), and a second disk
    `fs` (ext4, made here with mkfs.ext4) the guest mounts and keeps appending to: something to quiesce."""
    if not _NAME.match(name):
        raise GuestError(f"invalid VM name {name!r}", "use letters, digits, '.', '_' or '-' (max 63)")
    if fmt not in ("qcow2", "raw"):
        raise GuestError(f"unsupported disk format {fmt!r}", "use qcow2 or raw")
    size = parse_size(data_size)
    if size < _MIN_DISK:
        raise GuestError(f"data disk of {size} bytes is too small", f"use at least {_MIN_DISK >> 20} MiB")
    root = state_root(state_dir)
    vmdir = root / name
    if (vmdir / "vm.json").exists():
        raise VMExists(f"VM {name} already exists in {root}", f"use it, or delete {vmdir}")
    for sock in ("qmp.sock", "qmp2.sock", "qga.sock"):
        check_socket_path(vmdir / sock)
    files = ensure_guest_files(root)
    vmdir.mkdir(parents=True, exist_ok=True)
    kernel = vmdir / ("vmlinux" if files.pvh else "vmlinuz")
    initramfs = vmdir / "initramfs.cpio.gz"
    _link_or_copy(files.kernel, kernel)
    _link_or_copy(_agent_initramfs(root, files) if agent else files.initramfs, initramfs)
    if agent:
        _make_ext4(vmdir / FS_DISK, parse_size(fs_size))
    disk = vmdir / f"data.{fmt}"
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(disk), str(size)],
        capture_output=True, text=True, env=child_env(),
    )
    if proc.returncode != 0:
        raise GuestError(
            f"qemu-img create failed: {proc.stderr.strip()}", "check free space in the state dir"
        )
    meta = {
        "name": name,
        "fmt": fmt,
        "disk": disk.name,
        "data_size": size,
        "kernel": kernel.name,
        "kernel_version": files.kernel_version,
        "pvh": files.pvh,
        "initramfs": initramfs.name,
        "created": dt.datetime.now(dt.UTC).isoformat(),
    }
    if agent:
        meta |= {"agent": True, "fs_disk": FS_DISK}
    (vmdir / "vm.json").write_text(json.dumps(meta, indent=2) + "\n")
    vm = get_vm(name, root)
    _write_launch_script(vm, meta, choose_accel(root).accel)  # the VM's definition exists before a start
    return vm


def start_vm(
    name: str,
    state_dir: str | os.PathLike[str] | None = None,
    accel: str | None = None,
    interval: float | None = None,
) -> VMStatus:
    """Launch the VM daemonized; returns once QEMU runs (the guest boots on: see `wait_ready`).

    `accel`: tcg|kvm, default $HOTVM_ACCEL or the cached per-machine verdict. `interval`: seconds between
    the guest's ring writes (default 0.2)."""
    root = state_root(state_dir)
    vm, meta = _load(name, root)
    if vm.running:
        raise VMAlreadyRunning(f"VM {name} is already running (pid {vm.pid})", f"hotvm vm stop {name}")
    choice = choose_accel(root, accel)
    for stale in (vm.qmp, vm.qmp2, vm.dir / "qemu.pid"):
        stale.unlink(missing_ok=True)
    if vm.serial_log.exists():  # a fresh log: wait_ready must not find the previous boot's READY
        vm.serial_log.replace(vm.dir / "serial.log.1")
    cmd = _write_launch_script(vm, meta, choice.accel, interval)
    # QEMU's messages go to -D's file (qemu.log, rewritten at each start), early ones to the launcher.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=120,
            env=child_env(),
        )
        out.seek(0)
        startup = out.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        startup = startup or tail(vm.dir / "qemu.log", 3)  # with -D, QEMU logs even startup errors there
        raise GuestError(
            f"QEMU failed to start VM {name} (exit {proc.returncode}): {startup[-500:] or 'no output'}",
            f"run {vm.launch_script} to see it yourself",
        )
    run = {
        "accel": choice.accel,
        "accel_reason": choice.reason,
        "started": dt.datetime.now(dt.UTC).isoformat(),
    }
    (vm.dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return get_vm(name, root)


def wait_ready(name: str, timeout: float = 60.0, state_dir: str | os.PathLike[str] | None = None) -> int:
    """Wait for HOTVM-READY on the serial console; return its `last=` (newest record found on disk)."""
    vm = get_vm(name, state_dir)
    match = wait_for(vm.serial_log, _READY, timeout, lambda: _alive(vm))
    if not match:
        raise _not_ready(vm, timeout, "HOTVM-READY")
    return int(match.group(1))


def wait_heartbeat(
    name: str, min_seq: int = 1, timeout: float = 30.0, state_dir: str | os.PathLike[str] | None = None
) -> int:
    """Wait until the guest reports a durably written seq >= `min_seq`; return the newest reported."""
    vm = get_vm(name, state_dir)
    deadline = time.monotonic() + timeout
    while True:
        seqs = [int(s) for s in _HEARTBEAT.findall(read_text(vm.serial_log))]
        if seqs and seqs[-1] >= min_seq:
            return seqs[-1]
        if not _alive(vm) or time.monotonic() > deadline:
            raise _not_ready(vm, timeout, f"HOTVM-HEARTBEAT seq>={min_seq}")
        time.sleep(0.1)


def stop_vm(name: str, state_dir: str | os.PathLike[str] | None = None, timeout: float = 15.0) -> bool:
    """QMP `quit` (via either monitor), then SIGTERM, then SIGKILL. False if it was not running."""
    vm = get_vm(name, state_dir)
    marker = str(vm.qmp)
    if vm.running and vm.pid:
        for sock in (vm.qmp, vm.qmp2):
            monitor = Monitor(sock, name, connect_timeout=2.0, command_timeout=2.0)
            try:
                monitor.cmd("quit")
                break
            except HotvmError:
                continue  # monitor busy or gone: try the other one, then signals
            finally:
                monitor.close()
        if not wait_exit(vm.pid, marker, timeout / 2):
            terminate(vm.pid, marker, grace=timeout / 2)
    for leftover in (vm.qmp, vm.qmp2, vm.dir / "qemu.pid"):
        leftover.unlink(missing_ok=True)
    return vm.running


def delete_vm(name: str, state_dir: str | os.PathLike[str] | None = None) -> None:
    """Remove a stopped VM's directory (its disk included)."""
    vm = get_vm(name, state_dir)
    if vm.running:
        raise VMAlreadyRunning(f"VM {name} is running", f"hotvm vm stop {name} first")
    shutil.rmtree(vm.dir)


def get_vm(name: str, state_dir: str | os.PathLike[str] | None = None) -> VMStatus:
    return _load(name, state_root(state_dir))[0]


def list_vms(state_dir: str | os.PathLike[str] | None = None) -> list[VMStatus]:
    root = state_root(state_dir)
    if not root.is_dir():
        return []
    return [_load(d.name, root)[0] for d in sorted(root.iterdir()) if (d / "vm.json").is_file()]


def vm_config_entry(name: str, state_dir: str | os.PathLike[str] | None = None) -> dict:
    """The VM's entry for hotvm.yaml (hosts[].vms[]), boot_check included (a restored copy is "up"
    once the guest writes again)."""
    vm, meta = _load(name, state_root(state_dir))
    entry: dict = {
        "name": name,
        "qmp": str(vm.qmp),
        "config_files": [str(vm.launch_script)],
        "boot_check": {
            "ready_pattern": r"HOTVM-HEARTBEAT seq=\d+",
            "timeout_s": 120,
            "memory_mb": MEMORY_MB,
            "kernel": str(vm.dir / meta["kernel"]),
            "initrd": str(vm.dir / meta["initramfs"]),
            "append": BASE_APPEND,
        },
    }
    if vm.guest_agent is not None:
        entry["guest_agent"] = str(vm.guest_agent)
    return entry


def boot_check(
    disk_path: str | os.PathLike[str],
    fmt: str | None = None,
    timeout: float = 60.0,
    accel: str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> BootCheckResult:
    """Boot a (restored) data disk with the demo guest's kernel in a throwaway QEMU; time it until the guest
    is ready and writing again. The disk is attached with snapshot=on: the checked file never changes."""
    disk = Path(disk_path).resolve()
    if fmt is None:
        fmt = image_info(disk)["format"]  # also refuses an image a running QEMU writes to
    root = state_root(state_dir)
    files = ensure_guest_files(root)
    choice = choose_accel(root, accel)
    spec = BootCheckSpec(
        ready_pattern=_READY.pattern + r"[\s\S]*?" + _HEARTBEAT.pattern,
        timeout_s=timeout,
        memory_mb=MEMORY_MB,
        kernel=files.kernel,
        initrd=files.initramfs,
        append=BASE_APPEND,
    )
    with tempfile.TemporaryDirectory(prefix="hotvm-bootcheck-") as tmp:
        result = boot_disks(spec, [(str(disk), fmt)], Path(tmp) / "serial.log", choice.accel)
    ready, beat = _READY.search(result.log), _HEARTBEAT.search(result.log)
    return BootCheckResult(
        seconds=result.seconds,
        ready=result.ok,
        last_seq=int(ready.group(1)) if ready else None,
        serial_tail="\n".join(result.log.splitlines()[-15:]),
        heartbeat_seq=int(beat.group(1)) if beat else None,
        accel=choice.accel,
    )


def parse_size(value: int | str) -> int:
    """Bytes from an int or '64M' / '1G' / '512K' (binary units, like qemu-img)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
    if not match:
        raise GuestError(f"invalid size {value!r}", "use bytes or a number with K, M, G or T")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def _load(name: str, root: Path) -> tuple[VMStatus, dict]:
    vmdir = root / name
    try:
        meta = json.loads((vmdir / "vm.json").read_text())
    except FileNotFoundError:
        raise VMNotFound(f"no VM {name} in {root}", f"hotvm vm create {name}") from None
    try:
        run = json.loads((vmdir / "run.json").read_text())
    except (OSError, ValueError):
        run = {}
    qmp = vmdir / "qmp.sock"
    pid = read_pid(vmdir / "qemu.pid")
    running = pid_alive(pid, str(qmp))
    status = VMStatus(
        name=name,
        running=running,
        pid=pid if running else None,
        qmp=qmp,
        qmp2=vmdir / "qmp2.sock",
        disk=vmdir / meta["disk"],
        fmt=meta["fmt"],
        dir=vmdir,
        serial_log=vmdir / "serial.log",
        launch_script=vmdir / "launch.sh",
        accel=run.get("accel"),
        guest_agent=vmdir / "qga.sock" if meta.get("agent") else None,
    )
    return status, meta


def _write_launch_script(vm: VMStatus, meta: dict, accel: str, interval: float | None = None) -> list[str]:
    """The QEMU command line of this VM, also written to launch.sh (rewritten by every start)."""
    blockdev = {
        "driver": vm.fmt,
        "node-name": NODE_NAME,
        "file": {"driver": "file", "filename": str(vm.disk), "node-name": "data-file"},
    }
    append = f"hotvm.interval={interval:g}" if interval else ""
    cmd = guest_command(vm.dir / meta["kernel"], vm.dir / meta["initramfs"], vm.serial_log, accel, append)
    cmd += [
        *("-name", f"hotvm-{vm.name}", "-blockdev", json.dumps(blockdev, separators=(",", ":"))),
        *("-device", f"virtio-blk-pci,drive={NODE_NAME},id={DEVICE_ID}"),
        *qmp_args(vm.qmp),
        *qmp_args(vm.qmp2),
        *("-pidfile", str(vm.dir / "qemu.pid"), "-daemonize", "-D", str(vm.dir / "qemu.log")),
    ]
    if vm.guest_agent is not None:
        fs = {
            "driver": "raw",
            "node-name": "fs-disk",
            "file": {"driver": "file", "filename": str(vm.dir / meta["fs_disk"]), "node-name": "fs-file"},
        }
        cmd += [
            *("-blockdev", json.dumps(fs, separators=(",", ":"))),
            *("-device", "virtio-blk-pci,drive=fs-disk,id=fs"),
            *("-chardev", f"socket,path={escape_opt(str(vm.guest_agent))},server=on,wait=off,id=qga0"),
            *("-device", "virtio-serial-pci", "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}"),
        ]  # fmt: skip
    vm.launch_script.write_text(render_script(cmd, f"hotvm demo VM {vm.name}: the exact command hotvm runs"))
    vm.launch_script.chmod(0o755)
    return cmd


def _agent_initramfs(root: Path, files: GuestFiles) -> Path:
    """The agent variant of the shared initramfs, cached beside it (keyed by it and by qemu-ga)."""
    st = QEMU_GA.stat() if QEMU_GA.exists() else None
    key = f"{files.initramfs.name}-{st.st_size if st else 0}-{st.st_mtime_ns if st else 0}"
    key += AGENT_SH + AGENT_INIT
    out = files.initramfs.with_name(f"initramfs-qga-{hashlib.sha256(key.encode()).hexdigest()[:12]}.cpio.gz")
    if not out.exists():
        build_initramfs(out, find_kernel(files.kernel_version), agent=True)
    return out


def _make_ext4(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)
    proc = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "hotvm-fs", str(path)],
        capture_output=True, text=True, env=child_env(),
    )
    if proc.returncode != 0:
        raise GuestError(f"mkfs.ext4 {path} failed: {proc.stderr.strip()}", "apt-get install e2fsprogs")


def _alive(vm: VMStatus) -> bool:
    return pid_alive(read_pid(vm.dir / "qemu.pid"), str(vm.qmp))


def _not_ready(vm: VMStatus, timeout: float, awaited: str) -> GuestError:
    logs = [tail(vm.serial_log, 4), tail(vm.dir / "qemu.log", 4)]
    last = " | ".join(x.replace("\n", " / ") for x in logs if x) or "no output"
    if not _alive(vm):
        return VMNotRunning(
            f"VM {vm.name} is not running (waiting for {awaited})",
            f"last output: {last} — see {vm.serial_log} and {vm.dir / 'qemu.log'}",
        )
    return BootTimeout(
        f"VM {vm.name}: no {awaited} within {timeout:.0f} s (accel {vm.accel})",
        f"last output: {last} — try HOTVM_ACCEL=tcg or a longer timeout",
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
