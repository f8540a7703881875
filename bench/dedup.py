"""Dedup of two VMs cloned from one base image, and the chunk pipeline's speed vs the standard tools.

    .venv/bin/python bench/dedup.py [--size-gib 2] [--fill 0.5]

1. A template qcow2 (`--fill` of it random data) and two VMs on qcow2 overlays of it, each with 1 % of
   its own writes, are exported into one repository: the second VM must upload <= 5 % of its size
   (issue #5). Both images present the whole disk, as the guest sees it.
2. Next week: both clones get the same update (1 % of the disk as spread 64 KiB writes, the same bytes at
   the same places, as an OS update would) and an incremental export each, from their dirty extents:
   stored/changed per clone, as format 2 stored it (whole 4 MiB chunks, the baseline) and with format 3
   patches, in the same run on the same images.
3. hotvm's per-chunk work (sha256 + zstd level 1, one core) vs `sha256sum` and `zstd -1 -T1` on the same
   bytes from the page cache, in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_random_extents  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from hotvm.formats import patchplan  # noqa: E402
from hotvm.formats.export import CHUNK_SIZE, ZSTD_LEVEL, export_image  # noqa: E402
from hotvm.formats.repository import Repository  # noqa: E402
from targets import open_target  # noqa: E402


def clone_with_changes(template: Path, path: Path, changed: int, size: int, runs: int) -> None:
    """A VM on an overlay of the template with `changed` bytes of its own, in `runs` contiguous runs
    spread over the disk (a clone's own data: its config, logs, packages), written with qemu-io."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(path)],
                   check=True)
    blob = path.with_suffix(".blob")
    run_len = changed // runs
    blob.write_bytes(os.urandom(run_len))
    args = ["qemu-io", "-f", "qcow2"]
    for i in range(runs):
        args += ["-c", f"write -s {blob} {i * (size // runs)} {run_len}"]
    subprocess.run([*args, str(path)], check=True, capture_output=True)
    blob.unlink()


def next_week(work: Path, repo: Repository, clones: list, size: int) -> None:
    """The same update in both clones, then each one's incremental: baseline (patches off) and format 3."""
    k64 = 64 << 10
    blocks = sorted(random.Random(9).sample(range(size // k64), size // 100 // k64))
    pieces = work / "pieces"  # qemu-io's write -s takes a file from its start: one file per block
    pieces.mkdir(exist_ok=True)
    for i in range(len(blocks)):
        (pieces / f"{i}.bin").write_bytes(os.urandom(k64))
    for name, _ in clones:
        args = ["qemu-io", "-f", "qcow2"]
        for i, block in enumerate(blocks):
            args += ["-c", f"write -s {pieces / f'{i}.bin'} {block * k64} {k64}"]
        subprocess.run([*args, str(work / f"{name}-320.qcow2")], check=True, capture_output=True)
    dirty = [(b * k64, k64) for b in blocks]
    changed = len(blocks) * k64
    default = patchplan.MAX_PATCH_FRACTION
    ratios = {}
    print(f"next week: both clones get the same update, {changed >> 20} MiB as {len(blocks)} spread "
          "64 KiB writes")
    for label, fraction in (("baseline, whole chunks (format 2)", -1.0), ("format 3 patches", default)):
        patchplan.MAX_PATCH_FRACTION = fraction
        for name, first in clones:
            rec = export_image(repo, device="vda", image=str(work / f"{name}-320.qcow2"), previous=first,
                               dirty=dirty)  # fmt: skip
            ratios[(label, name)] = rec.bytes_new / changed
            print(f"  {label}: {name}: read {rec.bytes_read >> 20} MiB, stored {rec.bytes_new >> 20} MiB "
                  f"= {rec.bytes_new / changed:.2f}x what changed")
    patchplan.MAX_PATCH_FRACTION = default
    for name, _ in clones:
        print(f"SUMMARY clone next week, {name}: stored/changed "
              f"{ratios[('baseline, whole chunks (format 2)', name)]:.2f}x (baseline) -> "
              f"{ratios[('format 3 patches', name)]:.2f}x (format 3)")


def pipeline_speed(data_file: Path) -> None:
    data = data_file.read_bytes()
    start = time.perf_counter()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    for pos in range(0, len(data), CHUNK_SIZE):
        chunk = data[pos : pos + CHUNK_SIZE]
        hashlib.sha256(chunk).digest()
        compressor.compress(chunk)
    ours = time.perf_counter() - start
    tools = {}
    for name, cmd in (("sha256sum", ["sha256sum", str(data_file)]),
                      ("zstd -1 -T1", ["zstd", "-1", "-T1", "-q", "-c", str(data_file)])):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tools[name] = time.perf_counter() - start
    mib = len(data) / 2**20
    print(f"chunk pipeline (sha256 + zstd -{ZSTD_LEVEL}, 1 core): {mib / ours:7.0f} MiB/s")
    for name, seconds in tools.items():
        print(f"  {name:<12} alone:                   {mib / seconds:7.0f} MiB/s  "
              f"(hotvm hash+compress = {seconds / ours:.2f}x its throughput)")
    both = sum(tools.values())
    print(f"  sha256sum then zstd, serial:        {mib / both:7.0f} MiB/s  (ratio {both / ours:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--fill", type=float, default=0.5)
    args = parser.parse_args()
    size = int(args.size_gib * 2**30)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="hotvm-dedup-") as tmp:
        work = Path(tmp)
        raw = work / "template.raw"
        write_random_extents(str(raw), size, args.fill)
        template = work / "template.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(template)], check=True)
        repo = Repository(open_target(TargetConfig(name="bench", url=f"file://{work}/repo")))
        repo.ensure()
        for runs in (8, 320):  # clustered like a clone's own files; spread as 64 KiB writes (worst case)
            results = []
            for name in ("vm-a", "vm-b"):
                image = work / f"{name}-{runs}.qcow2"
                clone_with_changes(template, image, size // 100, size, runs)
                results.append((name, export_image(repo, device="vda", image=str(image))))
            print(f"each clone changed 1 % of the disk in {runs} runs of {size // 100 // runs >> 10} KiB:")
            for name, rec in results:
                share = 100 * rec.bytes_new / rec.virtual_size
                print(f"  {name}: {rec.bytes_read >> 20:6d} MiB read, {rec.bytes_new >> 20:6d} MiB uploaded "
                      f"= {share:5.2f} % of its size")
            second = results[1][1]
            verdict = "met" if second.bytes_new <= 0.05 * second.virtual_size else "MISSED"
            print(f"  second clone uploads {100 * second.bytes_new / second.virtual_size:.2f} % "
                  f"(target <= 5 %: {verdict})")
        next_week(work, repo, results, size)
        sample = work / "sample.bin"
        with open(raw, "rb") as src:
            sample.write_bytes(src.read(min(size, 512 * 2**20)))
        pipeline_speed(sample)


if __name__ == "__main__":
    main()
