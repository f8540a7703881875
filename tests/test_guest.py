"""The demo guest: record format and ring checks (fast), its writer run on the host under busybox (fast),
the initramfs, and real QEMU boots (marked `guest`, ~25 s under TCG).

No mocks: VMs are real QEMU processes in a per-test state dir, and every fixture kills what it started.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hotvm.config import VMConfig
from hotvm.errors import HotvmError
from hotvm.guest import (
    RING,
    boot_check,
    create_vm,
    delete_vm,
    get_vm,
    list_vms,
    make_record,
    start_vm,
    stop_vm,
    verify_ring,
    vm_config_entry,
    wait_heartbeat,
    wait_ready,
)
from hotvm.guest.accel import choose_accel, kvm_usable, probe_kvm
from hotvm.guest.artifacts import CACHE_DIR, ensure_guest_files, has_pvh_note
from hotvm.guest.disk import BLOCK, RING_BYTES, fill_byte
from hotvm.guest.errors import (
    GuestError,
    ImageUnreadable,
    VMAlreadyRunning,
    VMExists,
    VMNotFound,
    VMNotRunning,
)
from hotvm.guest.initramfs import (
    VIRTIO_MODULES,
    build_initramfs,
    find_kernel,
    read_module,
    resolve_modules,
)
from hotvm.guest.qemu import pid_alive, render_script
from hotvm.guest.scripts import writer_script
from hotvm.guest.vm import parse_size

BUSYBOX = shutil.which("busybox")
HAVE_QEMU = bool(shutil.which("qemu-system-x86_64") and shutil.which("qemu-img"))
needs_qemu_img = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img not installed")
needs_busybox = pytest.mark.skipif(not BUSYBOX, reason="busybox not installed")


def _kernel_installed() -> bool:
    try:
        find_kernel()
    except HotvmError:
        return False
    return True


needs_guest = pytest.mark.skipif(not (HAVE_QEMU and _kernel_installed()), reason="needs QEMU and a kernel")


def ring_image(seqs: range | list[int], size: int = RING_BYTES) -> bytearray:
    """A disk as the guest leaves it after writing `seqs` in order."""
    data = bytearray(size)
    for seq in seqs:
        block = seq % RING
        data[block * BLOCK : (block + 1) * BLOCK] = make_record(seq)
    return data


# --------------------------------------------------------------------------- record format and ring checks


def test_record_format_is_self_checking():
    rec = make_record(300)
    assert len(rec) == BLOCK
    assert rec.startswith(b"HOTVMREC 300 300\n")
    assert set(rec[len(b"HOTVMREC 300 300\n") :]) == {fill_byte(300)}
    # the record a write replaces (same block) pads with another byte: a torn write is visible
    assert fill_byte(300) != fill_byte(300 - RING)
    assert all(0x80 <= fill_byte(n) < 0xFF for n in range(1000))  # never printable, never zero


def test_empty_disk_is_consistent_and_starts_at_zero():
    report = verify_ring(bytes(RING_BYTES))
    assert (report.records, report.first_seq, report.last_seq, report.consistent) == (0, 0, 0, True)


def test_contiguous_records_before_and_after_wrapping():
    report = verify_ring(bytes(ring_image(range(1, 41))))
    assert (report.records, report.first_seq, report.last_seq, report.consistent) == (40, 1, 40, True)
    wrapped = verify_ring(io.BytesIO(bytes(ring_image(range(1, 601)))))  # a reader works too
    assert (wrapped.records, wrapped.first_seq, wrapped.last_seq) == (RING, 600 - RING + 1, 600)
    assert wrapped.consistent, wrapped.problems


def test_torn_record_is_reported():
    data = ring_image(range(1, 301))
    block = 301 % RING  # half of record 301 written over record 45
    data[block * BLOCK : block * BLOCK + 2048] = make_record(301)[:2048]
    report = verify_ring(bytes(data))
    assert not report.consistent
    assert any("torn" in p and "301" in p for p in report.problems), report.problems
    assert report.last_seq == 300


def test_hole_in_the_ring_is_not_a_point_in_time():
    data = ring_image(range(1, 50))
    data[20 * BLOCK : 23 * BLOCK] = bytes(3 * BLOCK)  # records 20-22 lost (e.g. a copy missed them)
    report = verify_ring(bytes(data))
    assert not report.consistent
    assert report.problems == ["records missing before seq 49: 20-22 (not a point in time)"]


def test_misplaced_foreign_and_short_data_are_reported():
    data = ring_image(range(1, 10))
    data[3 * BLOCK : 4 * BLOCK] = make_record(4)  # record 4 in block 3
    data[7 * BLOCK : 7 * BLOCK + 5] = b"hello"
    report = verify_ring(bytes(data))
    assert not report.consistent
    text = " | ".join(report.problems)
    assert "block 3: holds seq 4" in text and "block 7: not a ring record" in text
    short = verify_ring(bytes(ring_image(range(1, 5), size=BLOCK * 10)))
    assert not short.consistent and "only" in short.problems[-1]


@needs_qemu_img
def test_verify_ring_reads_qcow2_and_raw_files(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(ring_image(range(1, 301))) + bytes(RING_BYTES))  # 2 MiB, data past the ring
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    for image in (raw, qcow2):
        report = verify_ring(image)
        assert (report.first_seq, report.last_seq, report.consistent) == (300 - RING + 1, 300, True)
    with pytest.raises(ImageUnreadable):
        verify_ring(tmp_path / "missing.qcow2")


# --------------------------------------------------------------------------- the writer, on the host


@pytest.fixture
def busybox_env(tmp_path):
    """PATH with busybox applets only, so the writer runs as in the guest."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in ("sh", "dd", "head", "tr", "printf", "strings", "awk", "sort", "cmp", "mkdir", "sleep"):
        (bindir / applet).symlink_to(BUSYBOX)
    script = tmp_path / "writer.sh"
    script.write_text(writer_script())
    return {"PATH": str(bindir), "HOTVM_TMP": str(tmp_path)}, script


def run_writer(env_script, disk: Path, seconds: float) -> str:
    env, script = env_script
    out = disk.with_suffix(".out")
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(["sh", str(script), str(disk), str(out), "0.02"], env=env, cwd=disk.parent)
    try:
        time.sleep(seconds)
    finally:
        proc.terminate()
        proc.wait()
    return out.read_text()


@needs_busybox
def test_writer_fills_the_ring_and_resumes_after_the_last_complete_record(tmp_path, busybox_env):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 * RING_BYTES))
    out = run_writer(busybox_env, disk, 1.5)
    assert out.startswith("HOTVM-READY last=0\n") and "HOTVM-HEARTBEAT seq=" in out
    first = verify_ring(disk)
    assert first.consistent, first.problems
    assert first.first_seq == 1 and first.last_seq >= 10
    assert disk.read_bytes()[RING_BYTES:] == bytes(RING_BYTES)  # nothing written past the ring

    out = run_writer(busybox_env, disk, 0.8)
    assert out.startswith(f"HOTVM-READY last={first.last_seq}\n")
    second = verify_ring(disk)
    assert second.consistent and second.last_seq > first.last_seq

    # tear the newest record: the writer resumes after the one before and rewrites the torn block
    last = second.last_seq
    with disk.open("r+b") as fh:
        fh.seek((last % RING) * BLOCK + 1000)
        fh.write(bytes([fill_byte(last) ^ 1]) * 100)
    assert not verify_ring(disk).consistent
    out = run_writer(busybox_env, disk, 0.5)
    assert out.startswith(f"HOTVM-READY last={last - 1}\n")
    assert verify_ring(disk).consistent


# --------------------------------------------------------------------------- initramfs and helpers


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, content)} of a newc archive."""
    entries, pos = {}, 0
    while True:
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode = fields[11], fields[6], fields[1]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[pos : pos + filesize])
        pos = (pos + filesize + 3) & ~3


@pytest.mark.skipif(not (_kernel_installed() and BUSYBOX), reason="needs a kernel and busybox-static")
def test_initramfs_has_busybox_modules_in_order_and_valid_scripts(tmp_path):
    out = build_initramfs(tmp_path / "initrd.gz")
    entries = read_cpio(gzip.decompress(out.read_bytes()))
    init = entries["init"][1].decode()
    order = re.search(r"for m in (.*); do", init).group(1).split()
    assert [m for m in order if m in VIRTIO_MODULES] == list(VIRTIO_MODULES)
    for name in order:
        assert entries[f"lib/modules/{name}.ko"][1][:4] == b"\x7fELF"  # decompressed if needed
    assert entries["bin/busybox"][0] & 0o111 and entries["init"][0] & 0o111
    assert "dev/console" in entries
    for script in (init, entries["bin/hotvm-writer"][1].decode()):
        subprocess.run([BUSYBOX, "sh", "-n", "-c", script], check=True)
    assert out.read_bytes() == build_initramfs(tmp_path / "again.gz").read_bytes()  # reproducible


def test_module_resolution_follows_deps_skips_builtins_and_decompresses(tmp_path):
    kdir = tmp_path / "6.0-test"
    (kdir / "kernel").mkdir(parents=True)
    (kdir / "modules.dep").write_text(
        "kernel/virtio_blk.ko.xz: kernel/virtio.ko kernel/virtio_ring.ko\n"
        "kernel/virtio.ko: kernel/virtio_ring.ko\nkernel/virtio_ring.ko:\n"
    )
    (kdir / "modules.builtin").write_text(
        "kernel/virtio_pci.ko\nkernel/virtio_pci_modern_dev.ko\nkernel/virtio_pci_legacy_dev.ko\n"
    )
    (kdir / "kernel" / "virtio_blk.ko.xz").write_bytes(lzma.compress(b"\x7fELF-blk"))
    mods = resolve_modules(kdir)
    assert [n for n, _ in mods] == ["virtio_ring", "virtio", "virtio_blk"]
    assert read_module(mods[-1][1]) == b"\x7fELF-blk"
    (kdir / "modules.dep").write_text("kernel/virtio_ring.ko:\n")
    with pytest.raises(GuestError, match="module virtio not found"):
        resolve_modules(kdir)


def test_launch_script_runs_exactly_the_command(tmp_path):
    cmd = ["qemu-system-x86_64", "-append", "console=ttyS0 quiet", "-blockdev", '{"a":"b c"}', "-daemonize"]
    script = render_script(cmd, "test")
    body = script.split("exec ", 1)[1].replace("\\\n", " ")
    assert shlex.split(body) == cmd


def test_sizes_names_and_forced_accel(tmp_path, monkeypatch):
    assert parse_size("64M") == 64 << 20 and parse_size(4096) == 4096 and parse_size("1GiB") == 1 << 30
    with pytest.raises(GuestError):
        parse_size("lots")
    with pytest.raises(GuestError, match="invalid VM name"):
        create_vm("../escape", state_dir=tmp_path)
    with pytest.raises(GuestError, match="too small"):
        create_vm("tiny", data_size="1M", state_dir=tmp_path)
    with pytest.raises(GuestError, match="socket path too long"):
        create_vm("x" * 60, state_dir=tmp_path / ("d" * 60))
    with pytest.raises(VMNotFound):
        get_vm("nope", tmp_path)
    assert list_vms(tmp_path / "none") == []
    monkeypatch.setenv("HOTVM_ACCEL", "tcg")
    assert choose_accel(tmp_path).accel == "tcg"
    monkeypatch.setenv("HOTVM_ACCEL", "xen")
    with pytest.raises(GuestError):
        choose_accel(tmp_path)


# A process whose main thread exits first (like a SIGKILLed QEMU's) while another thread keeps a file locked.
MAIN_EXITS_FIRST = """
import ctypes, fcntl, os, sys, threading
held = open(sys.argv[1], "a")
fcntl.flock(held, fcntl.LOCK_EX)
threading.Thread(target=os.read, args=(int(sys.argv[2]), 1)).start()
print("locked", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def _main_thread_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_process_runs_until_its_last_thread_has_exited(tmp_path):
    """SIGKILLed, QEMU's main thread is a zombie at once while its other threads are still exiting, and those
    keep its files open: the disk image stays locked. Until the last one is gone the VM is running, or what
    comes right after a crash or a stop (verify_ring, the next start) finds the disk in use."""
    disk = tmp_path / "disk.img"
    wake_r, wake_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN_EXITS_FIRST, str(disk), str(wake_r)],
        pass_fds=[wake_r],
        stdout=subprocess.PIPE,
    )
    os.close(wake_r)
    try:
        assert proc.stdout.readline() == b"locked\n"
        deadline = time.monotonic() + 30
        while _main_thread_state(proc.pid) != "Z":
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.01)
        assert pid_alive(proc.pid, str(disk))  # no command line left: a process on its way out is still ours
        with disk.open("a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(wake_w)  # the last thread returns and exits
    deadline = time.monotonic() + 30
    while pid_alive(proc.pid, str(disk)):  # a zombie (not reaped yet) is not running
        assert time.monotonic() < deadline, "the process did not exit"
        time.sleep(0.01)
    with disk.open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not running: its files are closed
    assert proc.wait(30) == 0
    assert not pid_alive(os.getpid(), "no such marker")


# --------------------------------------------------------------------------- real VMs


def _qemu_pids_under(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory) -> Path:
    """Kernel + initramfs built once per session (they take ~1.3 s), shared by every state dir."""
    root = tmp_path_factory.mktemp("cache")
    ensure_guest_files(root)
    return root / CACHE_DIR


@pytest.fixture
def state_dir(tmp_path_factory, guest_cache):
    """A short state dir (unix socket paths); afterwards no QEMU of it may survive."""
    root = tmp_path_factory.mktemp("vms")
    (root / CACHE_DIR).mkdir()
    for cached in guest_cache.iterdir():
        os.link(cached, root / CACHE_DIR / cached.name)
    yield root
    for vm in list_vms(root):
        stop_vm(vm.name, root, timeout=5)
    leftovers = _qemu_pids_under(root)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"QEMU processes left running: {leftovers}"


@needs_guest
def test_start_failure_is_reported_with_qemus_message(state_dir):
    vm = create_vm("broken", state_dir=state_dir)
    vm.disk.unlink()
    with pytest.raises(GuestError, match="failed to start VM broken.*data.qcow2") as err:
        start_vm("broken", state_dir=state_dir, accel="tcg")
    assert "launch.sh" in err.value.hint and not get_vm("broken", state_dir).running
    with pytest.raises(VMNotRunning):
        wait_ready("broken", 5, state_dir)


@pytest.mark.guest
@needs_guest
def test_vm_lifecycle_ring_restart_crash_and_boot_check(state_dir, tmp_path):
    vm = create_vm("demo", state_dir=state_dir)
    with pytest.raises(VMExists):
        create_vm("demo", state_dir=state_dir)
    assert vm.fmt == "qcow2" and vm.disk.exists() and not vm.running
    assert "-daemonize" in vm.launch_script.read_text()  # the VM's definition exists before it runs

    # 1st boot: fresh disk, the ring advances
    t0 = time.monotonic()
    vm = start_vm("demo", state_dir=state_dir)
    assert vm.running and vm.pid and vm.qmp.exists() and vm.qmp2.exists()
    assert wait_ready("demo", 60, state_dir) == 0
    boot1 = time.monotonic() - t0
    with pytest.raises(VMAlreadyRunning):
        start_vm("demo", state_dir=state_dir)
    with pytest.raises(ImageUnreadable, match="in use"):
        verify_ring(vm.disk)  # never read the active image of a running VM
    seen = wait_heartbeat("demo", 3, 30, state_dir)
    assert wait_heartbeat("demo", seen + 2, 30, state_dir) >= seen + 2
    script = vm.launch_script.read_text()
    assert "-device virtio-blk-pci,drive=data-disk,id=data" in script and "qmp2.sock" in script
    entry = vm_config_entry("demo", state_dir)
    assert entry["qmp"] == str(vm.qmp) and entry["config_files"] == [str(vm.launch_script)]
    assert VMConfig(**entry).boot_check.kernel.exists()  # valid for hotvm.yaml as is
    [listed] = list_vms(state_dir)
    assert listed.running and listed.pid == vm.pid and listed.accel in ("tcg", "kvm")

    # stop while someone holds the main monitor: quit goes through the second one
    with socket.socket(socket.AF_UNIX) as busy:
        busy.connect(str(vm.qmp))
        assert stop_vm("demo", state_dir) is True
    assert not get_vm("demo", state_dir).running and not vm.qmp.exists()
    assert stop_vm("demo", state_dir) is False
    first = verify_ring(vm.disk)
    assert first.consistent, first.problems
    assert first.first_seq == 1 and first.last_seq >= seen + 2

    # 2nd boot continues after the last record; then QEMU "crashes" (SIGKILL)
    start_vm("demo", state_dir=state_dir)
    assert wait_ready("demo", 60, state_dir) == first.last_seq
    beat = wait_heartbeat("demo", first.last_seq + 3, 30, state_dir)
    os.kill(get_vm("demo", state_dir).pid, signal.SIGKILL)
    with pytest.raises(VMNotRunning):
        wait_heartbeat("demo", beat + 1000, 10, state_dir)
    crashed = verify_ring(vm.disk)
    assert crashed.consistent, crashed.problems
    assert crashed.first_seq == 1 and crashed.last_seq >= beat

    # boot-check a raw copy: it resumes from the copy's last record and leaves the copy untouched
    copy = tmp_path / "restored.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.disk), str(copy)], check=True)
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    result = boot_check(copy, timeout=60, state_dir=state_dir)
    assert result.ready, result.serial_tail
    assert result.last_seq == crashed.last_seq and result.heartbeat_seq == crashed.last_seq + 1
    assert 0 < result.seconds < 60
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    print(f"\nboot to READY: first start {boot1:.2f} s, boot_check {result.seconds:.2f} s ({result.accel})")

    delete_vm("demo", state_dir)
    assert list_vms(state_dir) == []


@pytest.mark.guest
@needs_guest
def test_raw_vm_and_boot_check_of_a_broken_disk(state_dir, tmp_path):
    vm = create_vm("rawvm", data_size="4M", fmt="raw", state_dir=state_dir)
    assert vm.disk.name == "data.raw" and vm.disk.stat().st_size == 4 << 20
    start_vm("rawvm", state_dir=state_dir, interval=0.05)
    assert wait_ready("rawvm", 60, state_dir) == 0
    wait_heartbeat("rawvm", 10, 30, state_dir)
    stop_vm("rawvm", state_dir)
    report = verify_ring(vm.disk)
    assert report.consistent and report.last_seq >= 10

    garbage = tmp_path / "garbage.raw"
    garbage.write_bytes(os.urandom(2 << 20))
    result = boot_check(garbage, fmt="raw", timeout=30, state_dir=state_dir)
    assert result.ready and result.last_seq == 0  # not our data: the guest starts a new ring


@pytest.mark.guest
@pytest.mark.skipif(not os.path.exists("/dev/kvm") or not HAVE_QEMU, reason="no /dev/kvm")
def test_kvm_probe_gives_a_verdict_and_leaves_nothing_running(state_dir, tmp_path, monkeypatch):
    # the probe's scratch dir under this test's own temp dir: a probe another xdist worker runs meanwhile
    # (any guest start without a cached verdict) is not this one's leftover
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    usable, why = kvm_usable()
    ok, reason = probe_kvm(state_dir, timeout=2)
    assert isinstance(ok, bool) and "KVM" in reason
    assert _qemu_pids_under(tmp_path / "hotvm-kvm-probe-") == []
    print(f"\nkvm_usable: {usable} ({why}); probe: {ok} ({reason})")


def test_pvh_note_detection():
    assert has_pvh_note(elf_with_note(b"Xen", 18))  # XEN_ELFNOTE_PHYS32_ENTRY
    assert not has_pvh_note(elf_with_note(b"Xen", 17))
    assert not has_pvh_note(elf_with_note(b"GNU", 18))


def elf_with_note(name: bytes, ntype: int) -> bytes:
    """An ELF64 header, one PT_NOTE program header and one note."""
    namez = name + b"\0"
    note = struct.pack("<III", len(namez), 4, ntype) + namez.ljust((len(namez) + 3) & ~3, b"\0") + bytes(4)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note
