"""Listing sets and a prune dry run through the generic set store vs the code before it (issue #18).

    .venv/bin/python bench/set_listing.py [--vms 20] [--sets 30] [--rounds 5] [--baseline ced47f1]

One file:// repository of `--vms` VMs x `--sets` complete image sets (plus a file set per VM) is written
once; then `Repository.list_sets()` and `prune_repository(..., dry_run=True)` run in child processes,
alternating between this tree and `--baseline` (a commit of this repository, unpacked with git archive),
so both read the same repository in the same run. Prints the medians and new/baseline ratios (< 1: faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import machine_load  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from hotvm.formats.manifest import DiskRecord, Manifest, new_backup_id  # noqa: E402
from hotvm.formats.repository import Repository  # noqa: E402
from targets import open_target  # noqa: E402

MEASURE = """
import json, sys, time
from hotvm.config import Keep, TargetConfig
from hotvm.formats.repository import Repository
from hotvm.prune import prune_repository
from targets import open_target
import datetime as dt
repo = Repository(open_target(TargetConfig(name="b", url=sys.argv[1])))
t = time.perf_counter(); n = len(repo.list_sets()); listed = time.perf_counter() - t
t = time.perf_counter()
r = prune_repository(repo, Keep(last=7), dry_run=True, now=dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
pruned = time.perf_counter() - t
print(json.dumps({"sets": n, "list": listed, "prune": pruned, "removed": len(r.removed)}))
"""


def build(url: str, vms: int, sets: int) -> None:
    repo = Repository(open_target(TargetConfig(name="b", url=url)))
    repo.ensure()
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    for v in range(vms):
        vm = f"vm{v:03d}"
        for s in range(sets):
            when = start + dt.timedelta(days=s, minutes=v)
            chunks = [(i, hashlib.sha256(f"{vm}/{s}/{i}".encode()).hexdigest()) for i in range(64)]
            record = DiskRecord(device="vda", source_path="/x", source_format="raw", virtual_size=64 << 22,
                                chunk_size=1 << 22, chunks=chunks, digest="0" * 64, frozen_at=when,
                                bytes_read=0, bytes_new=0, export_seconds=0.0)
            backup_id = new_backup_id(when)
            repo.mark_started(vm, backup_id, "h")
            repo.commit_manifest(Manifest(backup_id=backup_id, vm=vm, host="h", driver="qemu",
                                          started_at=when, completed_at=when, disks=[record]))


def run(tree: Path, url: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, url], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--sets", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default="ced47f1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        url = f"file://{tmp}/repo"
        build(url, args.vms, args.sets)
        results: dict[str, list[dict]] = {"baseline": [], "new": []}
        for _ in range(args.rounds):
            results["baseline"].append(run(base, url))
            results["new"].append(run(ROOT, url))
        outcomes = {(r["sets"], r["removed"]) for rows in results.values() for r in rows}
        assert len(outcomes) == 1, f"baseline and new disagree: {outcomes}"
        first = results["new"][0]
        print(f"{first['sets']} sets ({args.vms} VMs x {args.sets}); dry-run prune would remove "
              f"{first['removed']}; median of {args.rounds} rounds, alternating")
        for key in ("list", "prune"):
            old = statistics.median(r[key] for r in results["baseline"])
            new = statistics.median(r[key] for r in results["new"])
            print(f"  {key:6s} baseline {old * 1000:8.1f} ms   new {new * 1000:8.1f} ms   "
                  f"ratio {new / old:.2f}")
        print(f"caveats: {machine_load()}; file:// target (page cache warm for both)")


if __name__ == "__main__":
    main()
