"""Read-write mounts of one partition of a raw image, for writing files back into a restored disk.

The kernel reads ext2/3/4 (and vfat where the host kernel has it) through a loop device limited to the
partition; NTFS goes through ntfs-3g. On a host kernel without vfat (this one: a minimal VM kernel), FAT
goes through fusefat. docs/files-reading.md says why not libguestfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.errors import HotvmError
from hotvm.files.volumes import Volume
from hotvm.formats.repository import safe_name

EXT_TYPES = ("ext2", "ext3", "ext4")


def _run(args: list[str], what: str, hint: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=child_env())
    if proc.returncode != 0:
        raise HotvmError(f"{what}: {(proc.stderr or proc.stdout).strip()}", hint)
    return proc.stdout.strip()


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HotvmError(f"{what} needs root (loop devices and mounts)", "run hotvm as root on this host")


@contextmanager
def loop_device(image: Path, offset: int, length: int) -> Iterator[str]:
    """A loop device over bytes [offset, offset+length) of `image`; always detached afterwards."""
    _need_root(f"attaching {image}")
    if not Path("/dev/loop-control").exists():
        raise HotvmError("this host has no loop devices (/dev/loop-control)", "load the loop module")
    args = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(length), str(image)]
    device = _run(args, f"cannot attach {image} to a loop device", "free a loop device (losetup -D?)")
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, env=child_env())


def kernel_has(fstype: str) -> bool:
    try:
        names = Path("/proc/filesystems").read_text().split()
    except OSError:
        return False
    return fstype in names


GUEST_OPTS = "nosuid,nodev,noexec"
"""A guest's file system on the backup host: its setuid files, device nodes and programs stay inert."""


def _mount_args(fstype: str, device: str, target: Path) -> list[str]:
    if fstype in EXT_TYPES:
        return [
            "mount",
            "-t",
            fstype if kernel_has(fstype) else "ext4",
            "-o",
            GUEST_OPTS,
            device,
            str(target),
        ]
    if fstype == "vfat":
        loaded = kernel_has("vfat") or (
            subprocess.run(["modprobe", "vfat"], capture_output=True, env=child_env()).returncode == 0
        )
        if loaded:
            return ["mount", "-t", "vfat", "-o", GUEST_OPTS, device, str(target)]
        if shutil.which("fusefat"):
            return [
                "fusefat",
                "-f",
                "-o",
                f"rw+,{GUEST_OPTS}",
                device,
                str(target),
            ]  # foreground: we wait for its exit
        raise HotvmError(
            "this host can mount neither vfat (no kernel module) nor fusefat",
            "load the vfat module, or install the fusefat package",
        )
    if fstype == "ntfs":
        if not shutil.which("ntfs-3g"):
            raise HotvmError("writing into NTFS needs ntfs-3g", "install the ntfs-3g package")
        return ["ntfs-3g", "-o", GUEST_OPTS, device, str(target)]
    raise HotvmError(f"cannot write into a {fstype} file system", "supported: ext2, ext3, ext4, vfat, ntfs")


def _unmount(target: Path) -> None:
    subprocess.run(["sync"], capture_output=True, env=child_env())
    for _attempt in range(20):
        if not os.path.ismount(target):
            return
        if subprocess.run(["umount", str(target)], capture_output=True, env=child_env()).returncode == 0:
            return
        time.sleep(0.25)  # busy: a FUSE daemon still flushing, or a process with a file open
    subprocess.run(["umount", "-l", str(target)], capture_output=True, env=child_env())


def _start_daemon(args: list[str], mountpoint: Path, what: str, hint: str) -> subprocess.Popen:
    """A FUSE file system run in the foreground, so that unmounting can wait until it wrote everything."""
    # Its output goes to an unlinked file, never a pipe: fusefat talks on every request, and a full pipe
    # would block it inside a request our own process is waiting on.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the daemon, closed below
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=child_env()
    )
    deadline = time.monotonic() + 15
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.seek(0)
            said = log.read()[-2000:].decode(errors="replace").strip()
            log.close()
            raise HotvmError(f"{what}: {said or 'not mounted in time'}", hint)
        time.sleep(0.02)
    log.close()  # the daemon keeps its own descriptor
    return proc


def _wait_daemon(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def mounted_volume(image: Path, volume: Volume, fstype: str) -> Iterator[Path]:
    """The file system of `volume` in the RAW `image`, mounted read-write; yields the mount directory.
    It is always unmounted (data synced) and its loop device detached, also when the block fails."""
    _need_root(f"mounting {volume.key} of {image}")
    mountpoint = Path(tempfile.mkdtemp(prefix=f"hotvm-mount-{safe_name(volume.key)}-"))  # 0700
    try:
        with loop_device(Path(image), volume.start, volume.length) as device:
            args = _mount_args(fstype, device, mountpoint)
            what = f"cannot mount {fstype} volume {volume.key} of {image}"
            hint = "check that the image is raw and the file system clean (fsck it)"
            daemon = _start_daemon(args, mountpoint, what, hint) if args[0] == "fusefat" else None
            if daemon is None:
                _run(args, what, hint)
            try:
                yield mountpoint
            finally:
                _unmount(mountpoint)
                if daemon is not None:
                    _wait_daemon(daemon)
    finally:
        with contextlib.suppress(OSError):  # still mounted after a lazy unmount: leave the directory
            mountpoint.rmdir()
