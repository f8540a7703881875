"""The QEMU side of an instant restore: overlays over the NBD export, the process that runs them (the VM,
or qemu-storage-daemon when only the disks move home), and the block-stream jobs that make them local.

Each disk is a qcow2 overlay whose backing is the repository's NBD export:
    overlay.qcow2 (local, guest writes)  ->  raw  ->  nbd (unix socket, read-only, verified chunks)
`block-stream` with no base copies every cluster the overlay does not hold yet into it, then drops the
backing: the overlay is the whole disk. Clusters already copied (or written by the guest) are allocated
in the overlay, so a stream started again after an interruption copies only what is still missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hotvm.config import BootCheckSpec
from hotvm.errors import BlockJobError, HotvmError
from hotvm.guest.qemu import pid_alive, read_pid, tail, terminate
from hotvm.hypervisors.qemu_jobs import JobWatcher
from hotvm.hypervisors.qmp import Monitor, QmpCommandError
from hotvm.instant.state import InstantDisk, InstantState

QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
RECONNECT_DELAY_S = 30
"""QEMU's NBD client keeps requests waiting this long while it reconnects to a restarted export."""
_QDEV_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")


def nbd_backing(state: InstantState, disk: InstantDisk) -> dict:
    return {
        "driver": "raw",
        "node-name": f"{disk.node}-repo",
        "read-only": True,
        "file": {
            "driver": "nbd",
            "node-name": f"{disk.node}-nbd",
            "server": {"type": "unix", "path": str(state.nbd_socket)},
            "export": disk.device,
            "reconnect-delay": RECONNECT_DELAY_S,
        },
    }


def create_overlay(state: InstantState, disk: InstantDisk) -> None:
    """A qcow2 overlay of the disk's size whose header names the export (for qemu-img info): the running
    QEMU gets the backing explicitly, with its node names and reconnect policy."""
    backing = nbd_backing(state, disk)
    header = {"driver": "raw", "file": {k: v for k, v in backing["file"].items() if k != "node-name"}}
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "json:" + json.dumps(header), "-F", "raw",
         disk.overlay, str(disk.virtual_size)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise HotvmError(f"cannot create overlay {disk.overlay}: {proc.stderr.strip()}", "check the dir")
    os.chmod(disk.overlay, 0o600)  # it will hold the guest's data, like every restored disk


def blockdev(state: InstantState, disk: InstantDisk) -> str:
    node = {
        "driver": "qcow2",
        "node-name": disk.node,
        "file": {"driver": "file", "filename": disk.overlay, "node-name": f"{disk.node}-file"},
    }
    if depends_on_repository(disk):
        node["backing"] = nbd_backing(state, disk)
    return json.dumps(node, separators=(",", ":"))


def depends_on_repository(disk: InstantDisk) -> bool:
    """Read from the overlay's header: does it still have a backing file (the repository export)?"""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", disk.overlay], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise HotvmError(f"cannot read {disk.overlay}: {proc.stderr.strip()}", "is the file there?")
    return bool(json.loads(proc.stdout).get("backing-filename"))


def qdev_id(disk: InstantDisk, index: int) -> str:
    return disk.device if _QDEV_ID.match(disk.device) else f"disk{index}"


def vm_command(state: InstantState, spec: BootCheckSpec, accel: str) -> list[str]:
    """The restored VM, as the boot check runs it (no network: the copy must not meet the original),
    daemonized with a QMP socket, on its overlays."""
    run = Path(state.run_dir)
    cmd = [
        QEMU, "-accel", accel, "-M", "pc", "-m", str(spec.memory_mb), "-smp", "1", "-nodefaults",
        "-no-user-config", "-display", "none", "-nic", "none", "-name", f"hotvm-instant-{state.vm}",
        "-serial", f"file:{state.serial_log}",
        "-qmp", f"unix:{state.qmp},server=on,wait=off", "-qmp", f"unix:{state.qmp_user},server=on,wait=off",
        "-pidfile", str(state.pidfile), "-daemonize", "-D", str(run / "qemu.log"),
    ]  # fmt: skip
    if spec.kernel:
        cmd += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd:
            cmd += ["-initrd", str(spec.initrd)]
    for index, disk in enumerate(state.disks):
        boot = ",bootindex=0" if index == 0 and not spec.kernel else ""
        cmd += ["-blockdev", blockdev(state, disk),
                "-device", f"virtio-blk-pci,drive={disk.node},id={qdev_id(disk, index)}{boot}"]  # fmt: skip
    return cmd


def storage_daemon_command(state: InstantState) -> list[str]:
    """No VM: qemu-storage-daemon holds the overlays and runs the stream."""
    cmd = [QSD]
    for disk in state.disks:
        cmd += ["--blockdev", blockdev(state, disk)]
    return cmd + [
        "--chardev", f"socket,path={state.qmp},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0",
        "--chardev", f"socket,path={state.qmp_user},server=on,wait=off,id=qmp1", "--monitor", "chardev=qmp1",
        "--pidfile", str(state.pidfile), "--daemonize",
    ]  # fmt: skip


def running_pid(state: InstantState) -> int | None:
    pid = read_pid(state.pidfile)
    return pid if pid_alive(pid, str(state.qmp)) else None


def launch(state: InstantState, spec: BootCheckSpec | None, accel: str) -> float:
    """Start the runner (daemonized); returns time.monotonic() at launch (the start of time to ready)."""
    state.qmp.unlink(missing_ok=True)
    state.qmp_user.unlink(missing_ok=True)
    state.pidfile.unlink(missing_ok=True)
    if state.runner == "vm":
        assert spec is not None
        cmd = vm_command(state, spec, accel)
    else:
        cmd = storage_daemon_command(state)
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            timeout=120,
        )  # fmt: skip
        out.seek(0)
        said = out.read().decode(errors="replace").strip()
    if proc.returncode != 0 or running_pid(state) is None:
        said = said or tail(Path(state.run_dir) / "qemu.log", 3)
        raise HotvmError(
            f"the instant-restored {state.vm} did not start (exit {proc.returncode}): {said[-500:]}",
            f"see {Path(state.run_dir) / 'qemu.log'} and {Path(state.run_dir) / 'nbdkit.log'}",
        )
    return started


def stop(state: InstantState, timeout: float = 15.0) -> None:
    """QMP quit, then signals: the overlays are consistent either way (qcow2, guest writes flushed)."""
    pid = running_pid(state)
    if pid is None:
        return
    mon = Monitor(state.qmp, state.vm, connect_timeout=3, command_timeout=5)
    try:
        mon.cmd("quit")
    except HotvmError:
        pass
    finally:
        mon.close()
    deadline = time.monotonic() + timeout / 2
    while pid_alive(pid, str(state.qmp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    terminate(pid, str(state.qmp), grace=timeout / 2)


# ---------------------------------------------------------------------------- the stream


def job_id(disk: InstantDisk) -> str:
    return f"hotvm-stream-{disk.node}"


def start_streams(mon: Monitor, state: InstantState) -> list[InstantDisk]:
    """block-stream every disk that still has its repository backing (a finished job of an earlier run is
    dismissed first); returns the disks being streamed."""
    jobs = {j["id"]: j for j in mon.cmd("query-jobs")}
    streaming = []
    for disk in state.disks:
        if not repository_node_present(mon, disk):
            continue
        job = jobs.get(job_id(disk))
        if job is not None and job["status"] in ("concluded", "null"):
            mon.cmd("job-dismiss", {"id": job_id(disk)})
            job = None
        if job is None:
            args = {"job-id": job_id(disk), "device": disk.node, "auto-dismiss": False, "on-error": "report"}
            if state.speed:
                args["speed"] = state.speed
            mon.cmd("block-stream", args)
        else:  # still running from an earlier run (its waiter was killed): go on at the speed asked now
            mon.cmd("block-job-set-speed", {"device": job_id(disk), "speed": state.speed})
        streaming.append(disk)
    return streaming


def repository_node_present(mon: Monitor, disk: InstantDisk) -> bool:
    names = {n.get("node-name") for n in mon.cmd("query-named-block-nodes", {"flat": True})}
    return f"{disk.node}-nbd" in names


def wait_streams(
    mon: Monitor,
    state: InstantState,
    disks: list[InstantDisk],
    progress: Callable[[str, int, int], None] | None = None,
    interval: float = 0.25,
) -> None:
    """Poll the stream jobs until all concluded; BlockJobError naming the disk (and why) if one failed."""
    watchers = {d.device: JobWatcher(mon, state.vm, d.device, job_id(d), 1e9, "cancel") for d in disks}
    pending = dict(watchers)
    failures = []
    while pending:
        for device, watcher in list(pending.items()):
            job = watcher.job()
            if job is None:
                pending.pop(device)
                continue
            if progress:
                progress(device, int(job.get("current-progress", 0)), int(job.get("total-progress", 0)))
            if job["status"] in ("concluded", "null"):
                if job.get("error"):
                    failures.append(f"disk '{device}': {job['error']}")
                watcher.dismiss()
                pending.pop(device)
        if pending:
            mon.close()  # between polls the socket is free for `hotvm status` and other hotvm runs
            time.sleep(interval)
    if failures:
        raise BlockJobError(f"stream of {state.vm} stopped: {'; '.join(failures)}", "")


def cancel_streams(mon: Monitor, state: InstantState) -> None:
    for disk in state.disks:
        try:
            mon.cmd("job-cancel", {"id": job_id(disk)})
        except QmpCommandError:
            continue
