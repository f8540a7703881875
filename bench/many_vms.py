"""Many VMs on one host under the per-host limit: the weekly-image run ("backup all") at scale.

    .venv/bin/python bench/many_vms.py [--vms 50] [--disk-mib 128] [--data-mib 64] [--limit 2] [--timeline]
                                       [--mode deployments|in-process]

Starts N bare TCG QEMUs (64 MiB RAM, no guest OS) with one raw disk each (DISK-MIB, DATA-MIB of it random:
every export is real work, and no dedup between VMs), all on one host with max_concurrent_backups=LIMIT,
then runs the weekly-image flow (backup_policy, policy default) over them against a `prefect server start`
on loopback (or PREFECT_API_URL if set, e.g. the PostgreSQL one of scripts/prefect-server.sh).
  --mode deployments (default): as in production (docs/scale-out.md): `hotvm prefect setup`, `prefect
    deploy --all`, a worker for the host's queue and one for `fleet` (PREFECT_WORKER_QUERY_SECONDS=2), the
    weekly-image deployment run; each VM is its own backup-vm run (run_deployment) on the host's worker.
  --mode in-process: the CLI's path, backup_policy called here (without heartbeats, as the CLI runs
    flows), each VM a subflow of this process.
From the manifests (started_at / completed_at are taken inside the host's slot) and their step timings it
prints:
  - the maximum number of backups of the host that overlapped (target: never > LIMIT);
  - wall time of the flow run vs the ideal, sum of export step times / LIMIT (target: <= 1.2x, issue #14);
  - Prefect overhead per VM: (wall x LIMIT - sum of all step times) / N, i.e. slot time per VM that no
    step used (flow/task bookkeeping, slot handoffs), and the same with only export counted as work;
  - slot-seconds idle between the first slot taken and the last given back (ramp-up, hand-off, tail);
  - CPU seconds: of the fleet run (deployments: the workers and every flow-run process they started, per
    worker; in-process: this process), of the whole machine, and of the same backups without Prefect;
  - deployments mode: the time from the parent's start to its last child's start, how many child-run
    processes were alive at once, and per child the median / max of each phase: created -> pending (the
    worker's poll), pending -> running (a new Python process importing Prefect + the flow), running ->
    slot (session, reconcile, waiting), in the slot (export of it), after the slot (transfer, teardown);
  - the baseline measured in the same run (unless --no-baseline): the same N backups without Prefect
    (bench/prefect_overhead.py's direct path, LIMIT threads) into a second target, and the ratio of the
    fleet run's wall time to it.
The Prefect server's own CPU is not in these figures (it may be another machine); for the PostgreSQL one
of scripts/prefect-server.sh read it from /proc before and after (docs/scale-out.md "Fan-out cost").

Measured (2 cores shared with other work, PostgreSQL server of scripts/prefect-server.sh, limit 2,
--disk-mib 256 --data-mib 128: 128 MiB random per VM, an export ~1 s on an idle machine):
  50 VMs, deployments: 6.57x the ideal before, 6.15x after (load average 11-25 from other work); the same
    backups without Prefect ran 6.5x / 6.2x faster. Per VM: 5.1-5.4 CPU s of workers + flow-run processes
    above the backup's own 0.5-0.6 CPU s, plus ~2.8 CPU s in the Prefect server and PostgreSQL; a child
    process spent 22-26 s (median) from pending to running because 4 of them started at once on CPUs that
    were already saturated. At most 4 child processes alive at once; concurrency never above 2.
  50 VMs, in-process (the CLI): 1.88x the ideal, 0.49 CPU s of Prefect per VM.
  50 VMs, deployments, machine nearly to itself (load 5-8, mostly this run): 5.24x the ideal, 4.77x the
    same backups without Prefect; 4.76 CPU s per VM above the backup's own, server + PostgreSQL 1.9 CPU s
    per VM; pending -> running 9.9 s median; 503 of the 525 CPU-seconds available used: CPU-bound.
  20 VMs x 1 GiB random (--disk-mib 2048 --data-mib 1024, an export 15 s, load average 13): 1.63x the
    ideal, 6.7 idle slot-seconds per VM: a new child needed ~26 s from its creation to its slot, longer
    than the 16 s its waiting predecessor held the slot, so the one waiting child per slot
    (HOTVM_CHILDREN_PER_SLOT=2) could not hide it.
  16 VMs x 512 MiB random (--vms 16 --disk-mib 1024 --data-mib 512 --no-baseline, load ~5), same session:
    HOTVM_CHILDREN_PER_SLOT=2: 2.45x the ideal (102.6 s), 4.96 idle slot-seconds per VM, 4 processes;
    =3: 1.86x (81.5 s), 2.05 idle slot-seconds per VM, 6 processes. 3 is the default since.
A backup-vm run started by a worker costs ~2.2 CPU s before its first step (Prefect's import and settings
~1.5 s, the engine's API calls; hotvm's own modules ~0.2 s, none of the driver/target libraries), ~3 CPU s
in all with a 128 MiB export; with the workers' and the server's share ~8 CPU s per VM, whatever the disk
size. 50 VMs need ~400 CPU s, >= 200 s on 2 cores, against an ideal of 25-90 s: <= 1.2x is out of reach at
128 MiB. It needs (a) slot time per VM >= ~6 s so that CPU fits beside the exports, and (b) a child's
creation -> slot latency (~4 s idle, ~26 s on a saturated machine) below (HOTVM_CHILDREN_PER_SLOT - 1) x
its predecessor's slot time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench/ (_common): the script's own directory
from _common import machine_load, write_random_extents  # noqa: E402
from qemu_helpers import DiskSpec, start_qemu  # noqa: E402

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> subprocess.Popen | None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if os.environ.get("PREFECT_API_URL"):
        return None
    port = free_port()
    os.environ.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_UI_ENABLED": "false",
        }
    )
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"prefect server did not start: see {home / 'server.log'}")


def run_deployments(config: Path, work: Path) -> tuple[list[dict], float, float]:
    """Production path: setup, deploy, a host worker and a fleet worker, the weekly-image deployment run.
    Returns (per-VM rows, parent start -> end, parent start -> last child start)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from hotvm.config_file import load_config

    env = {
        **os.environ,
        "HOTVM_CONFIG": str(config),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run([sys.executable, "-m", "hotvm", "prefect", "setup"], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    SETUP_CPU.append(cpu_seconds()[0])
    host = load_config(config).hosts[0].name
    # as scripts/prefect-server.sh starts a worker: the checkout's bytecode compiled once, not by every run
    compileall = [sys.executable, "-m", "compileall", "-q", "-j", "0", "flows", "tasks", "hotvm", "targets"]
    subprocess.run(compileall, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "hotvm", "--work-queue", q],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=(work / f"worker-{q}.log").open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for q in (host, "fleet")
    ]
    try:
        with get_client(sync_client=True) as client:
            weekly = client.read_deployment_by_name("backup-policy/weekly-image")
            parent = client.create_flow_run_from_deployment(weekly.id, parameters={"config": str(config)})
            while not (parent := client.read_flow_run(parent.id)).state.is_final():
                time.sleep(1)
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])
                )
            )
            rows = [
                {"vm": c.parameters["vm"], "status": "success" if c.state.is_completed() else "failed",
                 "step": None, "error": c.state.message, "times": _child_times(client, c)}
                for c in children
            ]  # fmt: skip
            wall = (parent.end_time - parent.start_time).total_seconds()
            last_child = max(
                (c.start_time - parent.start_time).total_seconds() for c in children if c.start_time
            )
        for q, w in zip((host, "fleet"), workers, strict=True):
            WORKER_CPU[q] = _worker_cpu(w.pid)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:  # a worker still ending a child run: the figures are taken
                w.kill()
                w.wait(10)
    return rows, wall, last_child


WORKER_CPU: dict[str, tuple[float, float]] = {}
"""queue -> (CPU s of its worker process, CPU s of the flow-run processes it started and reaped)."""


def _worker_cpu(pid: int, wait_s: float = 20) -> tuple[float, float]:
    """A worker's own CPU and its reaped children's, once its flow-run processes have exited."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}/task/{t}/children").read_text().strip() for t in os.listdir(f"/proc/{pid}/task")
    ):  # a child run still in its teardown
        time.sleep(0.5)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) / os.sysconf("SC_CLK_TCK") for x in fields[11:15])
    return utime + stime, cutime + cstime


def _child_times(client, child) -> dict:  # noqa: ANN001 - a Prefect client and flow run
    """When the child run was created, and entered Pending (the worker took it) and Running (its process
    started the flow), from its state history; its end."""
    times = {"created": child.created, "end": child.end_time}
    for state in client.read_flow_run_states(child.id):
        key = state.type.value.lower()
        if key in ("pending", "running") and key not in times:
            times[key] = state.timestamp
    return times


SETUP_CPU: list[float] = []
"""CPU s of this process and its children when `hotvm prefect setup` and `prefect deploy` have ended."""


def cpu_seconds() -> tuple[float, float]:
    """(CPU s of this process + its waited-for children, CPU s busy on the whole machine: others' too)."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))  # fmt: skip
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return own, (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def print_timeline(results: list[dict], manifests: list, limit: int) -> None:
    """Where a child's time goes (deployments mode): median and max of each phase over the children."""
    by_vm = {m.vm: m for m in manifests}
    phases: dict[str, list[float]] = {}
    for r in results:
        t, m = r.get("times"), by_vm.get(r["vm"])
        if not t or m is None or "pending" not in t or "running" not in t:
            continue
        export = sum(s.seconds for s in m.steps if s.step == "export")
        for name, value in (
            ("created -> pending (worker poll, submit)", t["pending"] - t["created"]),
            ("pending -> running (child process start)", t["running"] - t["pending"]),
            ("running -> slot (session, reconcile, wait)", m.started_at - t["running"]),
            ("in slot (steps + slot bookkeeping)", m.completed_at - m.started_at),
            ("  of it export", export),
            ("slot -> end (transfer, artifact, teardown)", t["end"] - m.completed_at),
        ):
            phases.setdefault(name, []).append(value if isinstance(value, float) else value.total_seconds())
    if not phases:
        return
    alive = [(r["times"]["pending"], r["times"]["end"]) for r in results if r.get("times", {}).get("pending")]
    print(f"child run processes alive at once (pending .. end): at most {max_overlap(alive)}")
    print(f"per child (median / max of {len(next(iter(phases.values())))}):")
    for name, values in phases.items():
        print(f"  {name:45s} {statistics.median(values):6.2f} / {max(values):6.2f} s")


def slot_idle(spans: list[tuple], limit: int) -> float:
    """Slot-seconds no backup held between the first slot taken and the last one given back: ramp-up,
    hand-off latency and tail (wall x limit - slot-held time, without the time before the first slot)."""
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    return limit * (last - first).total_seconds() - sum((e - s).total_seconds() for s, e in spans)


def direct_baseline(vms: list[str], config: Path, limit: int) -> tuple[float, float]:
    """The same backups without Prefect, in this run: bench/prefect_overhead.py's direct path (the flow's
    hotvm.backup calls in its order) for every VM into a fresh target, `limit` at a time.
    Returns (wall s, CPU s of this process)."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect_overhead import direct_backup

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=limit) as pool:
        list(pool.map(lambda vm: direct_backup("direct", str(config), vm), vms))
    return time.perf_counter() - start, time.process_time() - cpu


def max_overlap(spans: list[tuple]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=50)
    ap.add_argument("--disk-mib", type=int, default=128)
    ap.add_argument("--data-mib", type=int, default=64)
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--timeline", action="store_true", help="print each VM's slot interval")
    ap.add_argument("--mode", choices=["deployments", "in-process"], default="deployments")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the same backups without Prefect (the baseline of the ratio)")  # fmt: skip
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hotvm-many-"))
    (work / "prefect").mkdir()
    server = start_server(work / "prefect")
    vms = {}
    try:
        t0 = time.perf_counter()
        for i in range(args.vms):
            d = work / f"vm{i:02d}"
            d.mkdir()
            write_random_extents(str(d / "disk.raw"), args.disk_mib * MiB, args.data_mib / args.disk_mib)
            vms[f"vm{i:02d}"] = start_qemu(d, [DiskSpec("disk", d / "disk.raw", format="raw")])
        print(f"{args.vms} QEMUs started in {time.perf_counter() - t0:.1f} s")
        config = work / "hotvm.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "hosts": [
                        {
                            "name": f"bench-{work.name}",
                            "max_concurrent_backups": args.limit,
                            "vms": [{"name": n, "qmp": str(v.qmp_path)} for n, v in vms.items()],
                        }
                    ],
                    "targets": [
                        {"name": "nas", "url": f"file://{work}/target", "default": True},
                        {"name": "direct", "url": f"file://{work}/direct"},
                    ],
                },
                sort_keys=False,
            )
        )
        cpu0 = (*cpu_seconds(), time.perf_counter())
        if args.mode == "deployments":
            results, wall, last_child = run_deployments(config, work)
        else:
            from flows._fleet import BackupsFailed
            from flows.backup_policy import backup_policy
            from hotvm.cli._common import no_heartbeats

            no_heartbeats()  # as `hotvm backup --all` runs it

            start = time.perf_counter()
            try:
                results = backup_policy(policy="default", config=str(config))
            except BackupsFailed as exc:
                results = exc.results
            wall, last_child = time.perf_counter() - start, None
        cpu = [b - a for a, b in zip(cpu0, (*cpu_seconds(), time.perf_counter()), strict=True)]
        for r in results:
            if r["status"] == "failed":
                print(f"FAILED {r['vm']} at {r.get('step')}: {r.get('error')}")
        direct_wall, direct_cpu = (None, 0.0)
        if args.baseline:
            direct_wall, direct_cpu = direct_baseline(list(vms), config, args.limit)
    finally:
        for vm in vms.values():
            vm.stop()
        if server is not None:
            server.terminate()
            server.wait(30)

    from hotvm.config import TargetConfig
    from hotvm.formats.repository import Repository
    from targets import open_target

    repo = Repository(open_target(TargetConfig(name="nas", url=f"file://{work}/target")))
    manifests = [e.manifest for e in repo.list_sets() if e.manifest]
    ok = sum(r["status"] == "success" for r in results)
    spans = [(m.started_at, m.completed_at) for m in manifests]
    peak = max_overlap(spans)
    export = sum(s.seconds for m in manifests for s in m.steps if s.step == "export")
    steps = sum(s.seconds for m in manifests for s in m.steps)
    in_slot = sum((m.completed_at - m.started_at).total_seconds() for m in manifests)
    ideal = export / args.limit
    if args.timeline:
        t_first = min(s for s, _ in spans)
        for m in sorted(manifests, key=lambda m: m.started_at):
            start, end = ((t - t_first).total_seconds() for t in (m.started_at, m.completed_at))
            print(f"  {m.vm} in its slot {start:6.2f} .. {end:6.2f} s")
    n = args.vms
    print(
        f"{ok}/{n} VMs backed up ({args.data_mib} MiB random of {args.disk_mib} MiB each), limit {args.limit}"
    )
    verdict = "met" if peak <= args.limit else "MISSED"
    print(f"max concurrency observed: {peak} (target: never > {args.limit}: {verdict})")
    print(f"wall {wall:.1f} s; ideal (sum of exports {export:.1f} s / {args.limit}) {ideal:.1f} s: "
          f"{wall / ideal:.2f}x (target <= 1.2x: {'met' if wall <= 1.2 * ideal else 'MISSED'})")  # fmt: skip
    print(f"all steps {steps:.1f} s (exports {export / steps:.0%}); slot-held time {in_slot:.1f} s")
    per_vm, per_vm_export = (wall * args.limit - steps) / n, (wall * args.limit - export) / n
    print(f"Prefect overhead per VM: (wall x {args.limit} - all steps) / {n} = {per_vm:.2f} s; "
          f"(wall x {args.limit} - exports) / {n} = {per_vm_export:.2f} s")  # fmt: skip
    idle = slot_idle(spans, args.limit)
    print(f"slot-seconds idle between the first slot taken and the last given back: {idle:.1f} s "
          f"({idle / n:.2f} s per VM)")  # fmt: skip
    if args.mode == "deployments":
        who, run_cpu = "workers + child run processes", cpu[0] - (SETUP_CPU[0] - cpu0[0])
    else:
        who, run_cpu = "this process", cpu[0]
    print(f"CPU of the fleet run: {who} {run_cpu:.1f} s ({run_cpu / n:.2f} s per VM); whole machine busy "
          f"{cpu[1]:.1f} s of {cpu[2] * os.cpu_count():.1f} s (setup, server, QEMUs, others)")  # fmt: skip
    if direct_wall is not None:
        print(f"CPU of the same backups without Prefect: {direct_cpu:.1f} s ({direct_cpu / n:.2f} s per VM): "
              f"Prefect's CPU per VM {(run_cpu - direct_cpu) / n:.2f} s")  # fmt: skip
    for q, (own, runs) in WORKER_CPU.items():
        what = "the weekly-image parent run" if q == "fleet" else f"its {n} backup-vm runs"
        print(f"  worker {q}: {own:.1f} CPU s itself, {runs:.1f} CPU s in {what}"
              + ("" if q == "fleet" else f" ({runs / n:.2f} s per VM)"))  # fmt: skip
    if args.mode == "deployments":
        print_timeline(results, manifests, args.limit)
    if direct_wall is not None:
        print(f"same {n} backups without Prefect ({args.limit} at a time, same run): {direct_wall:.1f} s; "
              f"hotvm fleet run / without Prefect = {wall / direct_wall:.2f}x")  # fmt: skip
    if last_child is not None:
        from flows._fleet import in_flight_per_host

        print(f"parent start -> last child start: {last_child:.1f} s (children start as slots free: at most "
              f"{in_flight_per_host(args.limit)} unfinished per host)")  # fmt: skip
    print(f"mode: {args.mode}; server: {os.environ.get('PREFECT_API_URL')}")
    print(machine_load())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
