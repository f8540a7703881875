"""quiesce: true on the QEMU driver, for real: the demo guest with Debian's qemu-ga in its initramfs, an
ext4 disk it mounts and keeps appending to, and the agent on a virtio port (hotvm vm create agent=True).

Evidence that the guest froze and thawed is the guest's own: qemu-ga logs each freeze to syslog (on the
serial console), the guest's appends to its ext4 disk stall while frozen and resume, and the agent
reports 'thawed' afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from helpers import hotvm_json

from hotvm.errors import ConfigError, HotvmError
from hotvm.guest import create_vm, list_vms, start_vm, stop_vm, vm_config_entry, wait_ready
from hotvm.guest.initramfs import QEMU_GA
from hotvm.hypervisors.qemu_agent import GuestAgent, GuestAgentError, frozen_filesystems
from hotvm.hypervisors.qmp import Monitor

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        not (shutil.which("qemu-system-x86_64") and QEMU_GA.exists() and shutil.which("mkfs.ext4")),
        reason="needs QEMU, qemu-guest-agent and e2fsprogs",
    ),
    pytest.mark.timeout(240),
]

FREEZE_LOGGED = "qemu-ga: info: guest-fsfreeze called"
FSBEAT = re.compile(r"HOTVM-FSBEAT seq=(\d+)")


class Guest:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.vm = create_vm(name, data_size="16M", state_dir=root, agent=True)
        assert self.vm.guest_agent is not None
        self.agent_path: Path = self.vm.guest_agent

    def log(self) -> str:
        return self.vm.serial_log.read_bytes().decode(errors="replace")

    def fs_beats(self, since: int = 0) -> list[int]:
        return [int(n) for n in FSBEAT.findall(self.log()[since:])]

    def wait_fs_beat_after(self, offset: int, timeout: float = 30) -> int:
        """The guest wrote to its ext4 disk again after `offset` of the serial log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beats = self.fs_beats(offset)
            if beats:
                return beats[-1]
            time.sleep(0.2)
        raise AssertionError(f"no write to the guest's file system after the backup:\n{self.log()[-800:]}")

    def status(self) -> str:
        with GuestAgent(self.agent_path, self.name) as agent:
            return agent.fsfreeze_status()

    def qmp2(self, command: str) -> None:
        mon = Monitor(self.vm.qmp2, self.name, connect_timeout=5, command_timeout=10)
        try:
            mon.cmd(command)
        finally:
            mon.close()


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    root = tmp_path_factory.mktemp("qvms")
    g = Guest(root, "qa")
    start_vm("qa", state_dir=root)
    try:
        wait_ready("qa", 90, state_dir=root)
        deadline = time.monotonic() + 60
        while True:  # qemu-ga comes up shortly after the ring writer
            try:
                assert g.status() == "thawed"
                break
            except GuestAgentError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        g.wait_fs_beat_after(0)
        yield g
    finally:
        for vm in list_vms(root):
            stop_vm(vm.name, root, timeout=5)
        for proc in Path("/proc").iterdir():  # nothing of ours may survive
            if proc.name.isdigit():
                try:
                    if str(root).encode() in (proc / "cmdline").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass


def write_config(path: Path, guest: Guest, quiesce: bool, agent: bool = True, overlay_dir: str = "") -> str:
    entry = vm_config_entry(guest.name, guest.root)
    if not agent:
        entry.pop("guest_agent")
    if overlay_dir:
        entry["overlay_dir"] = overlay_dir
    data = {
        "hosts": [{"name": "qhost", "vms": [entry]}],
        "targets": [{"name": "nas", "url": f"file://{path.parent}/target"}],
        "policies": [{"name": "app", "vms": ["*"], "quiesce": quiesce}],
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_quiesced_backup_is_application_consistent_and_writes_resume(prefect_server, guest, tmp_path):
    from flows.backup_vm import backup_vm
    from hotvm.restore import find_backup

    config = write_config(tmp_path / "hotvm.yaml", guest, quiesce=True)
    offset = len(guest.log())
    result = backup_vm(vm="qa", config=config)
    assert result["consistency"] == "application"
    assert find_backup(config, "qa", None, result["backup_id"]).consistency == "application"
    assert {d["device"] for d in result["disks"]} == {"data", "fs"}
    # the guest saw the freeze, is thawed now, and writes to its file system again
    assert FREEZE_LOGGED in guest.log()[offset:]
    assert guest.status() == "thawed"
    guest.wait_fs_beat_after(len(guest.log()))

    crash_config = write_config(tmp_path / "crash.yaml", guest, quiesce=False)
    offset = len(guest.log())
    result = backup_vm(vm="qa", config=crash_config)
    assert result["consistency"] == "crash"
    assert FREEZE_LOGGED not in guest.log()[offset:]
    rows = hotvm_json("list", "qa", "-c", config)  # the user sees which backup is which
    assert [r["consistency"] for r in rows] == ["application", "crash"]


def test_failing_redo_still_thaws_the_guest(guest, tmp_path):
    from hotvm.backup import add_redo, open_session

    config = write_config(tmp_path / "hotvm.yaml", guest, True, overlay_dir=str(tmp_path / "missing"))
    session = open_session("qa", config)
    offset = len(guest.log())
    with pytest.raises(HotvmError, match="cannot create overlay"):
        add_redo(session, ["data", "fs"], "failing", quiesce=True)
    assert FREEZE_LOGGED in guest.log()[offset:]  # it was frozen when the overlay failed ...
    assert guest.status() == "thawed"  # ... and thawed again
    guest.wait_fs_beat_after(len(guest.log()))
    with session.driver() as driver:  # nothing half-done left on the VM
        assert all(not d.hotvm_overlays for d in driver.list_disks())


def test_frozen_fs_stalls_writes_and_a_hung_agent_times_out(guest):
    with frozen_filesystems(guest.agent_path, "qa") as count:
        assert count == 1  # the ext4 disk (rootfs, proc, sys, devtmpfs are not freezable)
        printed = guest.fs_beats()
        before = len(guest.log())
        last = printed[-1] if printed else 0
        time.sleep(2)  # the window watched, not a wait for something
        # the guest's appends wait while it is frozen: the only beat that may still be printed is the one
        # whose append finished before the freeze (however late a loaded machine prints it), never a later one
        assert all(seq <= last + 1 for seq in guest.fs_beats(before)), guest.fs_beats(before)
    deadline = time.monotonic() + 30
    while max(guest.fs_beats(before), default=0) < last + 2:  # and after the thaw they resume
        assert time.monotonic() < deadline, f"no append after the thaw:\n{guest.log()[-800:]}"
        time.sleep(0.2)

    guest.qmp2("stop")  # a paused guest cannot answer: the freeze fails fast with a clear error
    try:
        t0 = time.monotonic()
        with (
            pytest.raises(GuestAgentError, match="no answer") as err,
            frozen_filesystems(guest.agent_path, "qa", sync_timeout=2, thaw_timeout=2),
        ):
            raise AssertionError("must not get here")
        assert time.monotonic() - t0 < 15 and "qemu-ga" in err.value.hint
    finally:
        guest.qmp2("cont")
    assert guest.status() == "thawed"  # the handshake skips the late replies of the timed-out request


def test_quiesce_without_agent_is_refused_at_plan_time(guest, tmp_path):
    from flows.backup_vm import quiesce_for
    from hotvm.backup import open_session

    session = open_session("qa", write_config(tmp_path / "hotvm.yaml", guest, True, agent=False))
    with pytest.raises(ConfigError, match="VM 'qa'.*quiesce") as err:
        quiesce_for(session)
    assert "guest_agent" in err.value.hint
    assert (
        quiesce_for(open_session("qa", write_config(tmp_path / "off.yaml", guest, False, agent=False)))
        is False
    )
