"""Export throughput vs `cp --sparse=always` (+ sync) of the same image, measured in the same run.

    .venv/bin/python bench/export.py [--size-gib 2] [--rounds 3]

Targets (issue #3): >= 0.9x cp throughput on a 50 %-filled dense image while compressing and hashing;
>= 5x faster than cp on a 10 %-allocated image (export time grows with allocated data, cp's with size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_caches, median, timed, write_random_extents  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from hotvm.formats.export import export_image  # noqa: E402
from hotvm.formats.repository import Repository  # noqa: E402
from targets import open_target  # noqa: E402


def cpu_seconds() -> float:
    """This process and the commands it ran and reaped (cp, sync, qemu-img): user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bench_image(work: Path, label: str, image: Path, rounds: int) -> tuple[float, float]:
    cp_times, export_times, cp_cpu, export_cpu = [], [], [], []
    for i in range(rounds):
        dst = work / f"cp-{i}.img"
        drop_caches()
        cp_cmd = ["sh", "-c", f"cp --sparse=always {image} {dst} && sync"]
        before = cpu_seconds()
        cp_times.append(timed(lambda cmd=cp_cmd: subprocess.run(cmd, check=True)))
        cp_cpu.append(cpu_seconds() - before)
        dst.unlink()
        repo_dir = work / f"repo-{uuid.uuid4().hex[:8]}"  # a removed repository's path is never reused
        repo = Repository(open_target(TargetConfig(name="bench", url=f"file://{repo_dir}")))
        repo.ensure()
        drop_caches()
        before = cpu_seconds()
        export_times.append(
            timed(
                lambda repo=repo: (
                    export_image(repo, device="d", image=str(image), fmt="raw"),
                    subprocess.run(["sync"], check=True),
                )
            )
        )
        export_cpu.append(cpu_seconds() - before)
        shutil.rmtree(repo_dir)
    cp_s, ex_s = median(cp_times), median(export_times)
    print(f"{label:<28} cp {cp_s:6.2f} s (cpu {median(cp_cpu):4.2f} s)   export {ex_s:6.2f} s "
          f"(cpu {median(export_cpu):4.2f} s)   export throughput = {cp_s / ex_s:5.2f}x cp")
    return cp_s, ex_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    size = int(args.size_gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="hotvm-bench-") as tmp:
        work = Path(tmp)
        cold = drop_caches()
        print(
            f"image {args.size_gib:g} GiB, {args.rounds} rounds, medians, caches "
            f"{'dropped before each run' if cold else 'NOT droppable here (warm reads)'}"
        )
        for label, fraction in (("dense (50% random)", 0.5), ("sparse (10% random)", 0.1)):
            image = work / f"{fraction}.raw"
            write_random_extents(str(image), size, fraction)
            bench_image(work, label, image, args.rounds)
            image.unlink()


if __name__ == "__main__":
    main()
