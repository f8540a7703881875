"""`make demo`: boot the tiny real guest, back it up hot with the weekly-image flow, restore, verify.

Everything runs on this machine: QEMU, Prefect's embedded local server, a file:// target in demo-out/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hotvm.child_env import child_env

WORK = Path(os.environ.get("HOTVM_DEMO_DIR", "demo-out")).resolve()
STATIC_OFFSET, STATIC_BYTES = 8 << 20, 48 << 20  # data beyond the guest's ring, written once before boot
console = Console()


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _write_static_data(disk: Path, fmt: str) -> str:
    """Random data the guest never touches: restored bytes must equal these exactly."""
    payload = os.urandom(STATIC_BYTES)
    blob = WORK / "static.bin"
    blob.write_bytes(payload)
    opts = f"driver={fmt},file.filename={disk}"
    subprocess.run(
        ["qemu-io", "--image-opts", "-c", f"write -s {blob} {STATIC_OFFSET} {STATIC_BYTES}", opts],
        check=True,
        capture_output=True,
        env=child_env(),
    )
    blob.unlink()
    return hashlib.sha256(payload).hexdigest()


def _static_digest(image: Path) -> str:
    raw = WORK / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True, env=child_env())
    with raw.open("rb") as fh:
        fh.seek(STATIC_OFFSET)
        digest = hashlib.sha256(fh.read(STATIC_BYTES)).hexdigest()
    raw.unlink()
    return digest


def _config(entry: dict) -> Path:
    path = WORK / "hotvm.yaml"
    import yaml

    config = {
        "hosts": [{"name": "local", "driver": "qemu", "max_concurrent_backups": 2, "vms": [entry]}],
        "targets": [{"name": "nas", "url": f"file://{WORK}/backups", "default": True}],
        "tapes": [{"name": "vtl", "url": f"vtl://{WORK}/vtl?media=2&capacity=128MiB"}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> int:
    """Run the demo; the guest is always shut down, whatever fails."""
    try:
        return _run()
    finally:
        from hotvm import guest

        state = WORK / "vms"
        for vm in guest.list_vms(state) if state.exists() else []:
            if vm.running:
                guest.stop_vm(vm.name, state_dir=state)


def _run() -> int:
    _prefect_env()
    from flows.backup_host import backup_host
    from flows.restore_vm import restore_vm
    from hotvm import guest
    from hotvm.cli._output import progress_bars

    if WORK.exists():
        for vm in guest.list_vms(WORK / "vms"):
            guest.stop_vm(vm.name, WORK / "vms")
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    state = WORK / "vms"
    ok = True

    console.rule("[bold]1. a tiny real VM that keeps writing to its data disk")
    vm = guest.create_vm("demo", data_size="128M", fmt="qcow2", state_dir=state)
    static_digest = _write_static_data(vm.disk, vm.fmt)
    vm = guest.start_vm("demo", state_dir=state)
    t0 = time.monotonic()
    guest.wait_ready("demo", timeout=180, state_dir=state)
    console.print(f"booted under {vm.accel} in {time.monotonic() - t0:.1f} s; serial log {vm.serial_log}")
    seq_before = guest.wait_heartbeat("demo", timeout=60, state_dir=state)
    config = _config(guest.vm_config_entry("demo", state_dir=state))
    console.print(f"config {config}; the guest is at record {seq_before}")

    console.rule("[bold]2. hot backup with the weekly-image flow (Prefect, embedded server)")
    with progress_bars(True):
        results = backup_host(host="local", config=str(config))
    result = results[0]
    seq_after = guest.wait_heartbeat("demo", timeout=60, state_dir=state)
    table = Table("step", "disk", "seconds", title=f"backup {result['backup_id']}")
    for step in result["steps"]:
        table.add_row(step["name"], step["device"] or "", f"{step['seconds']:.3f}")
    console.print(table)
    console.print(f"backup set: [bold]{result['url']}[/]")
    console.print(
        f"final-commit pivot stall: {result['pivot_stall_ms']:.1f} ms; the guest kept writing "
        f"during the backup (record {seq_before} -> {seq_after})"
    )

    console.rule("[bold]3. restore, verify the data, boot the restored VM")
    restored = restore_vm(
        vm="demo", to=str(WORK / "restore"), fmt="qcow2", boot_check_restored=True, config=str(config)
    )
    disk = Path(restored["disks"][0]["path"])
    ring = guest.verify_ring(disk)
    static_ok = _static_digest(disk) == static_digest
    check = restored["boot_check"]
    console.print(f"restored disk {disk}")
    console.print(
        f"guest records in the backup: {ring.first_seq}..{ring.last_seq}, "
        f"{'a clean point in time' if ring.consistent else 'INCONSISTENT: ' + '; '.join(ring.problems)}"
    )
    console.print(f"48 MiB of static data: {'identical' if static_ok else 'DIFFERENT'}")
    console.print(
        f"boot check: {'came up and writes again' if check['ok'] else 'FAILED: ' + check['detail']}"
        f" in {check['seconds']:.1f} s (measured recovery time)"
    )
    ok &= ring.consistent and static_ok and check["ok"]

    guest.stop_vm("demo", state_dir=state)
    live = guest.verify_ring(vm.disk)
    live_ok = live.consistent and live.last_seq >= ring.last_seq
    console.print(
        f"live disk after the backup: records up to {live.last_seq}, "
        f"{'consistent, on its original image' if live_ok else 'PROBLEM: ' + '; '.join(live.problems)}"
    )
    ok &= live_ok

    console.rule("[bold]4. weekly tape copy (virtual tape library), restore straight from tape")
    from flows.tape_copy import tape_copy, tape_restore

    copy = tape_copy(tape="vtl", config=str(config))
    from_tape = tape_restore(
        vm="demo", tape="vtl", to=str(WORK / "from-tape"), fmt="qcow2", config=str(config)
    )
    tape_disk = Path(from_tape["disks"][0]["path"])
    same = (
        subprocess.run(
            ["qemu-img", "compare", str(tape_disk), str(disk)], capture_output=True, env=child_env()
        ).returncode
        == 0
    )
    console.print(
        f"copy {copy['copy_id']} on {', '.join(copy['media'])}, expires {copy['expires'][:10]}; "
        f"restored from tape alone: {'identical to the disk restore' if same else 'DIFFERENT'}"
    )
    ok &= same
    summary = {
        "backup": result,
        "restore": restored,
        "ring": ring.__dict__,
        "static_data_ok": static_ok,
        "tape_copy": copy["copy_id"],
        "tape_restore_identical": same,
    }
    (WORK / "demo-result.json").write_text(json.dumps(summary, indent=2, default=str))
    console.rule("[bold green]demo passed" if ok else "[bold red]demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
