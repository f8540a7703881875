"""Prefect overhead: the backup_vm flow vs the same hotvm.backup calls without Prefect, in the same run.

    .venv/bin/python bench/prefect_overhead.py [--size-gib 4] [--rounds 3] [--tasks 20] [--cold]

A bare QEMU (TCG, no guest OS) runs one qcow2 disk of SIZE GiB, half of it random data (the export is
real work: read, sha256, zstd, write). Each round backs it up twice into a fresh local target (no dedup
skips): once with `backup_vm` (flows/backup_vm.py, every step a task) and once calling the hotvm.backup
functions in the flow's order, opening the session per step as the tasks do. The order alternates per
round; a first backup of each kind (one-time costs: imports, first limit, first artifact) is shown but not
counted. Wall time and CPU time (this process and its children, so the ephemeral server too) are both
reported: on a shared machine CPU time is the steadier of the two. Then a trivial flow with 0 and with
N no-op tasks (hotvm's task options) gives the fixed cost per flow run and per task run, and their sum for
backup_vm's 9 tasks is set against the measured overhead. The backups and probes run as the hotvm CLI runs
flows, without heartbeats (hotvm/cli/_common.py: no_heartbeats); the 0-task flow is also timed first with
Prefect's default heartbeats, for the ratio.

Prefect runs on its ephemeral local server (started by a warm-up flow before anything is timed), or on
the server at PREFECT_API_URL if that is set. Reads are warm (the image is in the page cache) unless
--cold drops the caches before every backup: warm reads make the export shortest, so the overhead % is
the conservative figure. Target (issue #3): overhead <= 10 % for the 4 GiB disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]  # bench/ (_common): the script's own directory
from _common import drop_caches, machine_load, median, timed, write_random_extents  # noqa: E402
from qemu_helpers import DiskSpec, RunningQemu, qemu_img, start_qemu  # noqa: E402

from hotvm import backup  # noqa: E402
from hotvm.formats.manifest import Manifest, StepTiming, utcnow  # noqa: E402
from hotvm.formats.repository import new_backup_id  # noqa: E402

VM, HOST, DEVICE = "bench-vm", "bench", "disk0"
TARGET_OVERHEAD = 0.10


def prefect_env(home: Path) -> None:
    """Settings Prefect reads at import time: quiet, no telemetry, a private home, a patient server start."""
    os.environ.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        }
    )
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_UI_ENABLED"] = "false"


def cpu_seconds(exclude: int) -> float:
    """CPU time of this process, its finished children and its live children but `exclude` (QEMU): with
    the ephemeral server that includes the Prefect server (a child process). Steadier than wall time here."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, rest = stat.read_text().rsplit(") ", 1)
        except (OSError, ValueError):
            continue  # gone meanwhile
        pid, fields = int(head.split(" (", 1)[0]), rest.split()
        if int(fields[1]) == os.getpid() and pid != exclude:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def make_image(work: Path, size: int) -> Path:
    raw, image = work / "disk.raw", work / "disk.qcow2"
    write_random_extents(str(raw), size, 0.5)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    subprocess.run(["sync"], check=True)
    return image


def write_config(work: Path, qmp: Path, targets: list[str]) -> Path:
    config = {
        "hosts": [{"name": HOST, "vms": [{"name": VM, "qmp": str(qmp)}]}],
        "targets": [{"name": name, "url": f"file://{work / 'targets' / name}"} for name in targets],
    }
    path = work / "hotvm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def direct_backup(target: str, config: str, vm: str = VM) -> dict:
    """backup_vm's body without Prefect: same hotvm.backup calls, same order, a session per step."""

    def session() -> backup.Session:
        return backup.open_session(vm, config)

    backup_id, started, steps = new_backup_id(), utcnow(), []

    def step(name: str, device: str | None, fn, *args):
        t0 = time.monotonic()
        result = fn(session(), *args)
        steps.append(StepTiming(step=name, device=device, seconds=round(time.monotonic() - t0, 4)))
        return result

    warnings = [f"reconciled: {a}" for a in step("reconcile", None, backup.reconcile)]
    plan = step("plan", None, backup.plan_disks, target, backup_id)
    records = {r.device: r for r in plan.done}
    frozen = step("add_redo", None, backup.add_redo, [d.device for d in plan.todo], backup_id)
    for disk in frozen:
        record = step("export", disk.device, backup.export_disk, target, backup_id, disk)
        step("add_redo", disk.device, backup.add_redo, [disk.device], backup_id)
        step("commit_level1", disk.device, backup.commit, disk.device, 1)
        final = step("commit_final", disk.device, backup.commit, disk.device, "final")
        records[disk.device] = record.model_copy(update={"pivot_stall_ms": final.stall_ms})
    archive = step("backup_config", None, backup.backup_config, target, backup_id)
    s = session()
    manifest = Manifest(
        backup_id=backup_id,
        vm=vm,
        host=s.host.name,
        driver=s.host.driver,
        started_at=started,
        completed_at=utcnow(),
        disks=list(records.values()),
        skipped_disks=plan.skipped,
        config_archive=archive,
        boot_check=s.vm.boot_check,
        steps=steps,
        warnings=warnings,
    )
    url = step("transfer", None, backup.transfer, target, manifest)
    return {
        "url": url,
        "disks": [{"device": d.device, "bytes_read": d.bytes_read} for d in manifest.disks],
        "steps": [{"name": s.step, "device": s.device, "seconds": s.seconds} for s in steps],
    }


def trivial_flows():  # Prefect is imported late on purpose: after prefect_env()
    from prefect import flow, task

    from tasks._options import STEP

    @task(name="bench-noop", **STEP)
    def noop(i: int) -> int:
        return i

    @flow(name="bench-tasks")
    def tasks_flow(n: int) -> tuple[float, float]:
        start = time.perf_counter()
        for i in range(n):
            noop(i)
        return start, time.perf_counter()

    return tasks_flow


def probe(tasks_flow: Callable[[int], tuple[float, float]], n: int) -> dict:
    """One trivial flow run: time to the body (start-up), in the body (n tasks), after it (teardown)."""
    t0 = time.perf_counter()
    body_start, body_end = tasks_flow(n)
    t1 = time.perf_counter()
    return {
        "total": t1 - t0,
        "startup": body_start - t0,
        "body": body_end - body_start,
        "teardown": t1 - body_end,
    }


Series = dict[str, list]


def run_rounds(
    work: Path, vm: RunningQemu, backup_vm: Callable[..., dict], config: str, rounds: int, cold: bool
) -> tuple[Series, Series, Series]:
    """Alternating backups into fresh targets; round -1 (the first of each kind) is shown but not counted."""
    walls: dict[str, list[float]] = {"prefect": [], "direct": []}
    cpus: dict[str, list[float]] = {"prefect": [], "direct": []}
    steps: dict[str, list[dict]] = {"prefect": [], "direct": []}
    for r in range(-1, rounds):
        for mode in ("prefect", "direct") if r % 2 == 0 else ("direct", "prefect"):
            target = f"r{r}-{mode}"
            subprocess.run(["sync"], check=True)  # the last round's writeback is not ours to pay
            if cold:
                drop_caches()
            cpu = cpu_seconds(vm.proc.pid)
            start = time.perf_counter()
            if mode == "prefect":
                result = backup_vm(vm=VM, target=target, config=config)
            else:
                result = direct_backup(target, config)
            wall = time.perf_counter() - start
            cpu = cpu_seconds(vm.proc.pid) - cpu
            if r >= 0:
                walls[mode].append(wall)
                cpus[mode].append(cpu)
                steps[mode].append({(s["name"], s["device"]): s["seconds"] for s in result["steps"]})
            read = sum(d["bytes_read"] for d in result["disks"])
            label = f"round {r + 1}" if r >= 0 else "warm-up"
            print(
                f"  {label:<8} {mode:<8} {wall:7.2f} s  ({read / (1 << 30):.2f} GiB read, "
                f"{read / wall / (1 << 20):6.1f} MiB/s, {cpu:5.2f} CPU s)"
            )
            shutil.rmtree(work / "targets" / target, ignore_errors=True)
    return walls, cpus, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=20, help="no-op tasks in the per-task probe flow")
    parser.add_argument("--probes", type=int, default=5, help="repetitions of each trivial flow")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every backup")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    size = int(args.size_gib * (1 << 30))

    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="hotvm-bench-") as tmp:
        work = Path(tmp)
        external = os.environ.get("PREFECT_API_URL")
        prefect_env(work / "prefect-home")
        t0 = time.perf_counter()
        tasks_flow = trivial_flows()
        from flows.backup_vm import backup_vm  # after prefect_env: Prefect reads its settings on import
        from hotvm.cli._common import no_heartbeats

        import_s = time.perf_counter() - t0
        print(
            f"disk {args.size_gib:g} GiB qcow2 (50 % random), {args.rounds} rounds, bare QEMU under TCG, "
            f"{'cold' if args.cold else 'warm'} reads; Prefect on "
            f"{external or 'its ephemeral local server'} (import {import_s:.1f} s); {machine_load()}"
        )
        image = make_image(work, size)
        targets = [f"r{r}-{mode}" for r in range(-1, args.rounds) for mode in ("prefect", "direct")]
        vmdir = work / "vm"
        vmdir.mkdir()
        vm = start_qemu(vmdir, [DiskSpec(DEVICE, image)])
        try:
            config = str(write_config(work, vm.qmp_path, targets))
            start_s = timed(lambda: tasks_flow(0))
            print(f"warm-up flow (includes the server start, not counted): {start_s:.1f} s")

            beating = [probe(tasks_flow, 0) for _ in range(args.probes)]  # Prefect's default: heartbeats
            no_heartbeats()  # as the hotvm CLI runs its flows (hotvm/cli/_common.py): no heartbeat thread
            flow0, flowN = [], []
            for _ in range(args.probes):
                flow0.append(probe(tasks_flow, 0))
                flowN.append(probe(tasks_flow, args.tasks))

            walls, cpus, steps = run_rounds(work, vm, backup_vm, config, args.rounds, args.cold)
        finally:
            vm.stop()

    print(f"  done, {machine_load()}")
    report(walls, cpus, steps, flow0, flowN, args.tasks)
    on, off = median([p["total"] for p in beating]), median([p["total"] for p in flow0])
    down_on, down_off = median([p["teardown"] for p in beating]), median([p["teardown"] for p in flow0])
    print(
        f"{'flow run, heartbeats on / off':<36}{on:9.2f} s / {off:.2f} s = {on / off:.1f}x   (trivial flow, "
        f"median of {len(beating)}; off = how the hotvm CLI runs flows; teardown with heartbeats "
        f"{down_on:.2f} s, without {down_off:.2f} s)"
    )


def report(walls: Series, cpus: Series, steps: Series, flow0: list[dict], flowN: list[dict], n: int) -> None:
    flow_s, direct_s = median(walls["prefect"]), median(walls["direct"])
    overhead = flow_s / direct_s - 1
    per_flow = median([p["total"] for p in flow0])
    per_task = median([p["body"] for p in flowN]) / n
    n_tasks = 9  # reconcile, plan, add_redo; per disk: export, add_redo, commit 1, final; config, transfer
    print()
    print(
        "step timings, median s (as each variant records them; the flow's include the task run around "
        "the call)"
    )
    print(f"  {'step':<22}{'direct':>9}{'flow':>9}{'flow - direct':>15}")
    common = [k for k in steps["direct"][0] if all(k in s for s in steps["prefect"])]
    for key in common:
        d = median([s[key] for s in steps["direct"]])
        f = median([s[key] for s in steps["prefect"]])
        print(f"  {key[0] + (f'[{key[1]}]' if key[1] else ''):<22}{d:9.3f}{f:9.3f}{f - d:15.3f}")
    d_sum = median([sum(s[k] for k in common) for s in steps["direct"]])
    f_sum = median([sum(s[k] for k in common) for s in steps["prefect"]])
    print(f"  {'sum of steps':<22}{d_sum:9.3f}{f_sum:9.3f}{f_sum - d_sum:15.3f}")
    print()
    print(
        f"{'backup_vm flow, wall':<36}{flow_s:9.2f} s   (median; rounds "
        f"{', '.join(f'{w:.2f}' for w in walls['prefect'])})"
    )
    print(
        f"{'same calls without Prefect, wall':<36}{direct_s:9.2f} s   (median; rounds "
        f"{', '.join(f'{w:.2f}' for w in walls['direct'])})"
    )
    print(
        f"{'overhead':<36}{flow_s - direct_s:9.2f} s = {overhead * 100:.1f} % = {flow_s / direct_s:.3f}x   "
        f"(target <= {TARGET_OVERHEAD * 100:g} %: {'met' if overhead <= TARGET_OVERHEAD else 'MISSED'})"
    )
    print(
        f"{'  of which outside these steps':<36}{(flow_s - f_sum) - (direct_s - d_sum):9.2f} s   "
        "(flow start-up, concurrency limit, artifacts, teardown)"
    )
    cpu_f, cpu_d = median(cpus["prefect"]), median(cpus["direct"])
    print(
        f"{'CPU time, flow / direct':<36}{cpu_f:9.2f} s / {cpu_d:.2f} s = {cpu_f / cpu_d:.3f}x   "
        "(this process + children, Prefect server included when ephemeral)"
    )
    startup = median([p["startup"] for p in flow0])
    teardown = [p["teardown"] for p in flow0]
    print(
        f"{'fixed cost per flow run':<36}{per_flow:9.2f} s   (flow with 0 tasks, median of {len(flow0)}: "
        f"start-up {startup:.2f} s, teardown {min(teardown):.2f}-{max(teardown):.2f} s)"
    )
    print(
        f"{'fixed cost per task run':<36}{per_task * 1000:9.1f} ms  (flow body with {n} no-op tasks / {n}, "
        f"median of {len(flowN)})"
    )
    fixed = startup + n_tasks * per_task
    print(
        f"{'predicted for 1 flow + 9 tasks':<36}{fixed:9.2f} s "
        f"(vs measured {flow_s - direct_s:.2f} s; without heartbeats no 1 s teardown wait)"
    )


if __name__ == "__main__":
    main()
