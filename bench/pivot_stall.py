"""Pivot stall of the final commit (p50/p95), with a writer busy on the disk, for a few configurations.

    .venv/bin/python bench/pivot_stall.py [--runs 20] [--fills 0,4,64] [--caches writeback,direct,noflush]

Each run is the layered REDO cycle through QemuDriver on a bare QEMU (TCG, no guest OS):
add_redo -> add_redo -> commit_level1 -> write FILL MiB into the last overlay -> commit_final, while a writer
thread keeps doing guest-like 64 KiB writes at random offsets (HMP qemu-io on the private QMP socket).

Three views of the same stall:
  recorded  CommitResult.stall_ms: block-job-complete -> job seen concluded (what the manifest records)
  drained   QEMU's own trace timestamps: the mirror drains the disk (guest I/O held) -> job concluded;
            split into "flush" (drained flush of the base, until job_completed) and "switch" (graph
            change in the job's prepare phase, until concluded); "converge" is complete -> drain, during
            which the guest still runs
  guest     the slowest writer op that overlapped the drained window (as a guest write sees it;
            each op also pays a QMP connect, compare with the writer's median op)

Configurations: FILL x CACHE, all interleaved round-robin (one VM each, started together) so drift on a
noisy disk hits every configuration alike. Cache modes set on the disk's -blockdev nodes: writeback
(QEMU's default, cache.direct=off), direct (cache.direct=on, O_DIRECT), noflush (cache.no-flush=on:
unsafe, a diagnostic only: it shows what the flushes cost). hotvm's overlays always use QEMU's default.
Baseline of the ratio: fill 0 MiB, writeback. Targets (issue #3): p50 <= 10 ms, p95 <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import machine_load, median, percentile  # noqa: E402
from qemu.qmp import ConnectError  # noqa: E402
from qemu_helpers import DiskSpec, RunningQemu, qemu_img, start_qemu  # noqa: E402

from hotvm.config import HostConfig, VMConfig  # noqa: E402
from hotvm.hypervisors.qemu import QemuDriver  # noqa: E402

TARGET_P50_MS, TARGET_P95_MS = 10.0, 50.0
DEVICE = "d0"
WRITE = 64 << 10
TRACE_EVENTS = ["qmp_block_job_complete", "mirror_before_drain", "job_completed", "job_state_transition"]
TRACE_LINE = re.compile(r"^\d+@(\d+\.\d+):(\w+) (?:s |job )?(0x[0-9a-f]+)?(.*)$")
CACHES = {
    "writeback": {},
    "direct": {"cache": {"direct": True}},
    "noflush": {"cache": {"no-flush": True}},
}


class Port:
    """The VM's private QMP socket, shared by the writer thread and the fill (one client at a time).

    A QMP event emitted while a fresh connection is being opened can arrive before the greeting, which
    the legacy client rejects (ConnectError): that connect is simply retried.
    """

    def __init__(self, vm: RunningQemu) -> None:
        self.vm, self.lock = vm, threading.Lock()
        self.reconnects = 0

    def io(self, cmd: str) -> tuple[float, float]:
        """Run one qemu-io command; its wall-clock span once it has the socket (not the wait for it)."""
        with self.lock:
            for attempt in range(3):
                try:
                    t0 = time.time()
                    self.vm.qemu_io(DEVICE, cmd)
                    return t0, time.time()
                except ConnectError:
                    if attempt == 2:
                        raise
                    self.reconnects += 1
        raise AssertionError("unreachable")


class Writer(threading.Thread):
    """Guest-like 64 KiB writes at random offsets, back to back; records each op's wall-clock span."""

    def __init__(self, port: Port, disk_bytes: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.port, self.slots = port, disk_bytes // WRITE
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.ops: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                offset = self.rng.randrange(self.slots) * WRITE
                self.ops.append(self.port.io(f"write -P 0x5a {offset} {WRITE}"))
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def finish(self) -> None:
        self.stop_event.set()
        self.join(30)
        if self.error is not None:
            raise RuntimeError(f"writer failed: {self.error}") from self.error


class HostLoad:
    """Another writer on the host: dd of 256 MiB + fdatasync in a loop on the same file system."""

    def __init__(self, work: Path) -> None:
        self.path = work / "host-load.bin"
        loop = f"while :; do dd if=/dev/zero of={self.path} bs=1M count=256 conv=fdatasync status=none; done"
        self.proc = subprocess.Popen(["sh", "-c", loop], start_new_session=True)
        time.sleep(0.5)  # let dirty pages pile up before the cycle starts

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.path.unlink(missing_ok=True)


@dataclass
class Config:
    fill_mib: int
    cache: str
    load: bool = False
    vm: RunningQemu | None = None
    driver: QemuDriver | None = None
    port: Port | None = None
    trace_offset: int = 0
    runs: list[dict] = field(default_factory=list)
    op_ms: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"fill {self.fill_mib:>3} MiB, {self.cache}" + (", host I/O" if self.load else "")


def start_vm(work: Path, cfg: Config, disk_mib: int) -> None:
    tmp = work / f"{cfg.cache}-{cfg.fill_mib}{'-load' if cfg.load else ''}"
    tmp.mkdir()
    image = tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), f"{disk_mib}M")
    opts = CACHES[cfg.cache]
    node = {
        "driver": "qcow2",
        "node-name": f"{DEVICE}-fmt",
        **opts,
        "file": {"driver": "file", "filename": str(image), "node-name": f"{DEVICE}-file", **opts},
    }
    # -msg timestamp=on makes the log trace backend prefix each event with pid@seconds.micros (wall clock)
    trace = [arg for event in TRACE_EVENTS for arg in ("-trace", event)] + ["-msg", "timestamp=on"]
    cfg.vm = start_qemu(tmp, [DiskSpec(DEVICE, image, blockdev=node)], extra_args=trace)
    cfg.driver = QemuDriver(VMConfig(name=f"bench-{tmp.name}", qmp=cfg.vm.qmp_path), HostConfig(name="bench"))
    cfg.port = Port(cfg.vm)


def read_trace(cfg: Config) -> list[tuple[float, str, str, str]]:
    """New trace lines in QEMU's log since the last call: (wall time, event, pointer, rest)."""
    assert cfg.vm is not None
    with cfg.vm.log_path.open("rb") as fh:
        fh.seek(cfg.trace_offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    cfg.trace_offset += end
    events = []
    for line in data[:end].decode(errors="replace").splitlines():
        m = TRACE_LINE.match(line)
        if m:
            events.append((float(m.group(1)), m.group(2), m.group(3) or "", m.group(4)))
    return events


def pivot_window(events: list[tuple[float, str, str, str]]) -> dict:
    """Times of the final commit from QEMU's trace: complete, last drain, job_completed, concluded."""
    done = [i for i, e in enumerate(events) if e[1] == "qmp_block_job_complete"]
    if not done:
        raise RuntimeError("no qmp_block_job_complete in QEMU's trace: is the trace backend 'log'?")
    start = done[-1]
    t_complete, _, job, _ = events[start]
    drain = completed = concluded = None
    for t, name, ptr, rest in events[start:]:
        if ptr != job:
            continue
        if name == "mirror_before_drain":
            drain = t
        elif name == "job_completed" and completed is None:
            completed = t
        elif name == "job_state_transition" and "-->concluded" in rest:
            concluded = t
            break
    if drain is None or completed is None or concluded is None:
        raise RuntimeError(f"incomplete trace for the final commit of job {job}")
    return {"complete": t_complete, "drain": drain, "completed": completed, "concluded": concluded}


def cycle(cfg: Config, run: int, disk_bytes: int, work: Path) -> dict:
    assert cfg.driver is not None and cfg.port is not None
    read_trace(cfg)  # skip whatever came before this cycle
    load = HostLoad(work) if cfg.load else None
    writer = Writer(cfg.port, disk_bytes, seed=run)
    writer.start()
    try:
        tag = f"bench{run}"
        cfg.driver.add_redo([DEVICE], tag)
        cfg.driver.add_redo([DEVICE], tag)
        cfg.driver.commit_level1(DEVICE)
        if cfg.fill_mib:
            cfg.port.io(f"write -P 0xcd 0 {cfg.fill_mib}M")
        time.sleep(0.05)  # let the writer get going again after the fill held the socket
        result = cfg.driver.commit_final(DEVICE)
        time.sleep(0.05)  # the op that overlapped the pivot finishes
    finally:
        writer.finish()
        if load is not None:
            load.stop()
    w = pivot_window(read_trace(cfg))
    overlapping = [t1 - t0 for t0, t1 in writer.ops if t0 < w["concluded"] and t1 > w["drain"]]
    cfg.op_ms += [(t1 - t0) * 1000 for t0, t1 in writer.ops]
    return {
        "recorded": result.stall_ms,
        "drained": (w["concluded"] - w["drain"]) * 1000,
        "flush": (w["completed"] - w["drain"]) * 1000,
        "switch": (w["concluded"] - w["completed"]) * 1000,
        "converge": (w["drain"] - w["complete"]) * 1000,
        "lag": result.stall_ms - (w["concluded"] - w["complete"]) * 1000,
        "guest": max(overlapping) * 1000 if overlapping else float("nan"),
        "commit_s": result.seconds,
    }


def p(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct):7.1f}"


def report(configs: list[Config], baseline: Config) -> None:
    base_p50 = percentile([r["recorded"] for r in baseline.runs], 50)
    w = 38
    print()
    print(
        f"final-commit pivot stall, ms, {len(baseline.runs)} runs each (targets: p50 <= {TARGET_P50_MS:g}, "
        f"p95 <= {TARGET_P95_MS:g}); x base = recorded p50 / p50 of '{baseline.label}'"
    )
    print(
        f"{'configuration':<{w}} {'recorded p50':>12} {'p95':>7} {'x base':>7} {'drained p50':>12} "
        f"{'p95':>7} {'guest p50':>10} {'p95':>7}  targets"
    )
    for cfg in configs:
        rec = [r["recorded"] for r in cfg.runs]
        drained = [r["drained"] for r in cfg.runs]
        guest = [r["guest"] for r in cfg.runs]
        ok = percentile(rec, 50) <= TARGET_P50_MS and percentile(rec, 95) <= TARGET_P95_MS
        print(
            f"{cfg.label:<{w}} {p(rec, 50):>12} {p(rec, 95)} {percentile(rec, 50) / base_p50:6.2f}x "
            f"{p(drained, 50):>12} {p(drained, 95)} {p(guest, 50):>10} {p(guest, 95)}  "
            f"{'met' if ok else 'MISSED'}"
        )
    print()
    print(
        "where the time goes, ms, p50 / max: converge = complete -> drain (guest runs); flush + switch = "
        "drained window (guest held); poll lag = recorded - (complete -> concluded in QEMU's trace)"
    )
    print(
        f"{'configuration':<{w}} {'converge':>15} {'flush':>15} {'switch':>15} {'poll lag':>15} "
        f"{'writer op p50':>14} {'commit_final s':>15}"
    )
    for cfg in configs:
        cols = []
        for key in ("converge", "flush", "switch", "lag"):
            vals = [r[key] for r in cfg.runs]
            cols.append(f"{percentile(vals, 50):6.1f} / {max(vals):6.1f}")
        print(
            f"{cfg.label:<{w}} {cols[0]:>15} {cols[1]:>15} {cols[2]:>15} {cols[3]:>15} "
            f"{median(cfg.op_ms):14.1f} {median([r['commit_s'] for r in cfg.runs]):15.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fills", default="0,4,64", help="MiB written into the last overlay (comma list)")
    parser.add_argument(
        "--caches",
        default="writeback,direct,noflush",
        help=f"cache modes of the disk, from {','.join(CACHES)}",
    )
    parser.add_argument(
        "--load-caches",
        default="writeback,direct",
        help="cache modes also measured (fill 0) while another process writes and fdatasyncs "
        "on the host ('' for none)",
    )
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    fills = [int(x) for x in args.fills.split(",")]
    caches = args.caches.split(",")
    load_caches = [c for c in args.load_caches.split(",") if c]
    if unknown := set(caches + load_caches) - set(CACHES):
        parser.error(f"unknown cache mode(s): {', '.join(sorted(unknown))}")
    if max(fills) >= args.disk_mib:
        parser.error("--fills must stay below --disk-mib")
    configs = [Config(fill, cache) for cache in caches for fill in fills]
    configs += [Config(0, cache, load=True) for cache in load_caches]
    disk_bytes = args.disk_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="hotvm-bench-") as tmp:
        try:
            for cfg in configs:
                start_vm(Path(tmp), cfg, args.disk_mib)
            print(
                f"{len(configs)} configurations x {args.runs} runs (+1 warm-up each), interleaved; "
                f"{args.disk_mib} MiB qcow2 disk, bare QEMU under TCG, writer: 64 KiB random writes; "
                f"{machine_load()}"
            )
            t0 = time.monotonic()
            for run in range(-1, args.runs):
                for cfg in configs:
                    result = cycle(cfg, run + 1, disk_bytes, Path(tmp))
                    if run >= 0:
                        cfg.runs.append(result)
                print(
                    f"\r  round {run + 2}/{args.runs + 1} ({time.monotonic() - t0:5.0f} s)",
                    end="",
                    flush=True,
                )
            print(f"  done, {machine_load()}")
        finally:
            for cfg in configs:
                if cfg.driver is not None:
                    cfg.driver.close()
                if cfg.vm is not None:
                    cfg.vm.stop()
    retried = sum(c.port.reconnects for c in configs if c.port is not None)
    if retried:
        print(f"(the writer re-opened the QMP socket {retried} time(s): an event came before the greeting)")
    base = next((c for c in configs if c.fill_mib == 0 and c.cache == "writeback" and not c.load), configs[0])
    report(configs, base)


if __name__ == "__main__":
    main()
