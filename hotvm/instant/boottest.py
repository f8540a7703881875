"""The boot restore test through the instant path (`hotvm verify --boot`, docs/instant.md).

The copy boots straight from the backup set (isolated: no network, its writes in scratch overlays): time
to ready is seconds of I/O whatever the disk size, and that is the VM's measured RTO. Then the disks are
streamed through the same export, which checks every chunk of the set (what every restore test
promises); the stream's time is recorded beside the RTO as the time until the VM no longer needs the
repository (`stream_seconds`).
"""

from __future__ import annotations

import time
from pathlib import Path

from hotvm import restore
from hotvm.bootcheck import default_accel
from hotvm.config import Config
from hotvm.errors import HotvmError
from hotvm.formats.manifest import Manifest
from hotvm.instant import core, runner


def instant_boot_test(cfg: Config, target: str | None, manifest: Manifest, scratch: Path) -> dict:
    """Same keys as hotvm.verify.restore_into, plus mode and stream_seconds; never raises for damage."""
    started = time.monotonic()
    problems: list[str] = []
    boot = None
    stream_seconds = None
    state = core.prepare(cfg, manifest.vm, scratch, manifest.backup_id, target, start=True)
    try:
        core.expose(cfg, state)
        launched = core.run(state) or time.monotonic()
        setup = launched - started
        spec = core.boot_spec(state)
        try:
            seconds = core.wait_ready(state, launched)
            boot = {"ok": True, "seconds": seconds, "detail": f"'{spec.ready_pattern}' seen on the serial "
                    "console (booted from the backup set)", "accel": default_accel()}  # fmt: skip
        except HotvmError as exc:
            seconds = round(time.monotonic() - launched, 3)
            boot = {"ok": False, "seconds": seconds, "detail": exc.message, "accel": default_accel()}
            problems.append(f"boot check failed: {exc.message}")
        console = state.serial_log.read_text(errors="replace") if state.serial_log.exists() else ""
        boot["log"] = console[-4000:]
        stream_started = time.monotonic()
        try:
            core.start_stream(state)
            core.wait_stream(state)
            stream_seconds = round(time.monotonic() - stream_started, 3)
        except HotvmError as exc:
            problems.append(exc.message)
    except HotvmError as exc:
        problems.append(exc.message)
        setup = time.monotonic() - started
    finally:
        runner.stop(state)
        from hotvm.instant.export import stop_export
        from hotvm.instant.state import forget

        stop_export(Path(state.run_dir))
        forget(state)
    config_files: list[str] = []
    try:
        config_files = restore.restore_config_files(cfg, target, manifest, scratch)
    except HotvmError as exc:
        problems.append(exc.message)
    ready = round(setup + (boot["seconds"] if boot else 0.0), 3)
    return {
        "vm": manifest.vm,
        "backup_id": manifest.backup_id,
        "host": manifest.host,
        "disks": [{"device": d.device, "path": d.overlay, "format": "qcow2", "bytes": d.virtual_size}
                  for d in state.disks],  # fmt: skip
        "config_files": config_files,
        "restore_seconds": round(setup, 3),
        "boot_check": boot,
        "seconds_to_ready": ready,
        "stream_seconds": stream_seconds,
        "verified": not problems,
        "problems": problems,
    }
