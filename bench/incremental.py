"""Incremental-forever backups with QEMU dirty bitmaps: bytes moved, time vs the full, restore vs cp.

    .venv/bin/python bench/incremental.py [--size-gib 4] [--fill 0.5] [--changed 0.01]

One run on a bare QEMU (TCG, no guest OS) with one qcow2 disk of SIZE holding FILL random data:
  1. full backup (the flow's steps as plain calls: add_redo + bitmap, export, add_redo, commit x2, manifest)
  2. CHANGED of the disk rewritten as random 64 KiB writes spread over the whole disk (HMP qemu-io),
     then an incremental backup; twice: first as format 2 stored it (whole 4 MiB chunks: the baseline,
     patches switched off), then with format 3 patches (formats/patchplan.py)
  3. the same amount rewritten as one contiguous range, then another incremental (baseline, then patches)
  4. restore of the spread points (whole chunks vs patches), and of the last point to a raw file vs `cp`
     of the live image file (both fsynced)
  5. the size of a 1 TiB disk's manifest: without patches, after a 1 % spread week, at the patch cap
Figures: dirty bytes per the bitmap / bytes the guest changed (the bitmap's own overhead), bytes read /
bytes changed (adds the 4 MiB chunk rounding), compressed bytes uploaded, full / incremental wall time.
Targets (issue #5): moved / changed <= 1.1 plus chunk rounding; incremental >= 20x faster than the full;
restore >= 0.8x cp.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import machine_load, write_random_extents  # noqa: E402
from qemu_helpers import DiskSpec, RunningQemu, qemu_img, start_qemu  # noqa: E402

from hotvm import backup  # noqa: E402
from hotvm.formats import patchplan  # noqa: E402
from hotvm.formats.manifest import DiskRecord, Manifest  # noqa: E402
from hotvm.restore import restore_one_disk  # noqa: E402

MiB, GiB, K64 = 1 << 20, 1 << 30, 64 << 10
CHUNK = 4 * MiB


def run_backup(session: backup.Session, backup_id: str) -> tuple[Manifest, float]:
    """The steps of flows/backup_vm.py without Prefect (its per-task overhead is benched elsewhere)."""
    start = time.perf_counter()
    backup.reconcile(session)
    plan = backup.plan_disks(session, None, backup_id)
    records = {}
    for disk in backup.add_redo(session, [d.device for d in plan.todo], backup_id, track_changes=True):
        records[disk.device] = backup.export_disk(
            session, None, backup_id, disk, baseline=plan.baselines.get(disk.device)
        )
        backup.add_redo(session, [disk.device], backup_id)
        backup.commit(session, disk.device, 1)
        backup.commit(session, disk.device, "final")
    now = backup.utcnow()
    manifest = Manifest(backup_id=backup_id, vm=session.vm.name, host=session.host.name, driver="qemu",
                        started_at=now, completed_at=now, disks=list(records.values()))  # fmt: skip
    backup.transfer(session, None, manifest)
    backup.drop_bitmaps(session, backup.superseded_bitmaps(plan.baselines, records))
    return manifest, time.perf_counter() - start


def bitmap_count(vm: RunningQemu, image: Path, name: str) -> int:
    for node in vm.qmp("query-named-block-nodes", flat=True):  # type: ignore[union-attr]
        if node["file"] == str(image) and node["drv"] == "qcow2":
            return next(b["count"] for b in node.get("dirty-bitmaps", []) if b["name"] == name)
    raise AssertionError("no bitmap")


def report(label: str, manifest: Manifest, seconds: float, changed: int, dirty: int, full_s: float) -> None:
    d = manifest.disks[0]
    print(f"{label}: {d.export_mode}")
    print(f"  guest changed {changed / MiB:8.1f} MiB; bitmap dirty {dirty / MiB:8.1f} MiB "
          f"(bitmap/changed {dirty / changed:.3f})")  # fmt: skip
    print(f"  read {d.bytes_read / MiB:8.1f} MiB (read/changed {d.bytes_read / changed:.2f}: "
          f"chunk rounding {d.bytes_read / dirty:.2f}x), uploaded {d.bytes_new / MiB:.1f} MiB "
          f"compressed (uploaded/changed {d.bytes_new / changed:.2f}), "
          f"reused {d.bytes_reused / MiB:.0f} MiB")  # fmt: skip
    ratio = full_s / seconds
    print(f"  wall {seconds:.2f} s (export {d.export_seconds:.2f} s); full/incremental {ratio:.1f}x "
          f"({'met' if ratio >= 20 else 'MISSED'} >= 20x)")  # fmt: skip
    patches = sum(1 for e in d.chunks if len(e) == 4)
    print(f"  stored/changed {d.bytes_new / changed:.2f}x ({patches} patch entries; manifest disk record "
          f"{len(d.model_dump_json()) / 1024:.0f} KiB)")


def manifest_sizes() -> None:
    """A 1 TiB disk's record as a manifest holds it (JSON, indent 1): no patches (format 2's size), after
    one week of 1 % changed as spread 64 KiB writes, and with every chunk at MAX_PATCHES_PER_CHUNK."""
    size, chunks = 1 << 40, (1 << 40) // CHUNK
    name = lambda i: hashlib.sha256(str(i).encode()).hexdigest()  # noqa: E731
    rng = random.Random(3)
    whole = [(i, name(i)) for i in range(chunks)]
    week = sorted(rng.sample(range(size // K64), size // 100 // K64))
    typical = sorted(whole + [(b * K64 // CHUNK, name(-b), b * K64 % CHUNK, K64) for b in week],
                     key=lambda e: (e[0], -1 if len(e) == 2 else e[2]))  # fmt: skip
    cap = patchplan.MAX_PATCHES_PER_CHUNK
    worst = [e for i in range(chunks) for e in [(i, name(i))] + [
        (i, name(-i * cap - k - 1), k * (CHUNK // cap), K64) for k in range(cap)]]
    sizes = []
    for entries in (whole, typical, worst):
        record = DiskRecord(device="vda", source_path="/x", source_format="qcow2", virtual_size=size,
                            chunk_size=CHUNK, chunks=entries, digest="0" * 64, frozen_at=backup.utcnow(),
                            bytes_read=0, bytes_new=0, export_seconds=0.0)  # fmt: skip
        sizes.append(len(record.model_dump_json(indent=1)) / 1e6)
    print(f"1 TiB disk manifest: {sizes[0]:.0f} MB whole chunks, {sizes[1]:.0f} MB after a 1 % spread week, "
          f"{sizes[2]:.0f} MB worst (every chunk {cap} patches); goal < 200 MB: "
          f"{'met' if max(sizes) < 200 else 'MISSED'}")


def set_patches(on: bool) -> str:
    """Format 3 patches on, or off (every dirty chunk whole: what format 2 stored, the baseline)."""
    patchplan.MAX_PATCH_FRACTION = DEFAULT_FRACTION if on else -1.0
    return "format 3 patches" if on else "baseline, whole chunks (format 2)"


DEFAULT_FRACTION = patchplan.MAX_PATCH_FRACTION


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--fill", type=float, default=0.5)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under /var/tmp)")
    args = ap.parse_args()
    size = int(args.size_gib * GiB)
    work = Path(tempfile.mkdtemp(prefix="hotvm-bench-inc-", dir=args.dir or "/var/tmp"))
    raw, image = work / "seed.raw", work / "disk.qcow2"
    filled = write_random_extents(str(raw), size, args.fill)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    print(f"disk: {size / GiB:.0f} GiB qcow2, {filled / GiB:.2f} GiB random data; {machine_load()}")
    vm = start_qemu(work, [DiskSpec("data", image)])
    try:
        (work / "hotvm.yaml").write_text(
            f"hosts:\n  - name: bench\n    vms:\n      - name: vm\n        qmp: {vm.qmp_path}\n"
            f"targets:\n  - name: t\n    url: file://{work}/target\n"
        )
        session = backup.open_session("vm", work / "hotvm.yaml")
        full, full_s = run_backup(session, "20240101T000000Z-0001")
        d = full.disks[0]
        print(f"full: read {d.bytes_read / MiB:.0f} MiB, uploaded {d.bytes_new / MiB:.0f} MiB, "
              f"wall {full_s:.2f} s")  # fmt: skip

        changed = int(size * args.changed) // K64 * K64
        rng = random.Random(5)
        source = work / "src.bin"  # each write's own random (incompressible) content: no dedup flatters
        n_set, last, ratios, sets = 2, "20240101T000000Z-0001", {}, {}
        for on in (False, True):
            label = set_patches(on)
            blocks = rng.sample(range(size // K64), changed // K64)
            t0 = time.perf_counter()
            for n in blocks:  # random 64 KiB writes spread over the whole disk
                source.write_bytes(os.urandom(K64))
                vm.qemu_io("data", f"write -s {source} {n * K64} {K64}")
            writes_s = time.perf_counter() - t0
            dirty = bitmap_count(vm, image, f"hotvm-{last}")
            last = f"2024010{n_set}T000000Z-{n_set:04d}"
            spread, spread_s = run_backup(session, last)
            n_set += 1
            print(f"({len(blocks)} writes took {writes_s:.1f} s)")
            report(f"incremental, spread 64 KiB writes, {label}", spread, spread_s, changed, dirty, full_s)
            ratios[("spread", on)] = spread.disks[0].bytes_new / changed
            sets[on] = spread
        for on in (False, True):
            label = set_patches(on)
            start = rng.randrange(0, (size - changed) // CHUNK) * CHUNK + K64  # not chunk-aligned on purpose
            (work / "range.bin").write_bytes(os.urandom(changed))
            vm.qemu_io("data", f"write -s {work / 'range.bin'} {start} {changed}")
            dirty = bitmap_count(vm, image, f"hotvm-{last}")
            last = f"2024010{n_set}T000000Z-{n_set:04d}"
            contiguous, contiguous_s = run_backup(session, last)
            n_set += 1
            report(f"incremental, one contiguous range, {label}", contiguous, contiguous_s, changed, dirty,
                   full_s)
            ratios[("contiguous", on)] = contiguous.disks[0].bytes_new / changed
        for case, goal in (("spread", 2.0), ("contiguous", 1.1)):
            after = ratios[(case, True)]
            print(f"SUMMARY {case}: stored/changed {ratios[(case, False)]:.2f}x (baseline) -> {after:.2f}x "
                  f"(format 3; goal <= {goal}x: {'met' if after <= goal else 'MISSED'})")

        vm.qmp("stop")  # the live image must not move while cp and the restore are compared with it
        subprocess.run(["sync"], check=True)
        speeds = {}
        for on, manifest in sets.items():  # a point of whole chunks vs a point with patches on top
            dest = work / f"restored-{on}"
            t0 = time.perf_counter()
            restored = restore_one_disk(work / "hotvm.yaml", None, manifest, "data", dest, "raw")
            speeds[on] = restored.bytes_written / (time.perf_counter() - t0)
            os.unlink(restored.path)
        patched = sum(1 for p in sets[True].disks[0].pieces() if p.patches)
        print(f"restore of the spread point: whole chunks {speeds[False] / MiB:.0f} MiB/s, with {patched} "
              f"patched chunks {speeds[True] / MiB:.0f} MiB/s (ratio {speeds[True] / speeds[False]:.2f}x)")
        dest = work / "restored"
        t0 = time.perf_counter()
        restored = restore_one_disk(work / "hotvm.yaml", None, contiguous, "data", dest, "raw")
        restore_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(["cp", str(image), str(work / "copy.qcow2")], check=True)
        fd = os.open(work / "copy.qcow2", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        cp_s = time.perf_counter() - t0
        alloc = os.stat(image).st_blocks * 512
        same = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", restored.path,
                               str(image)], capture_output=True).returncode == 0  # fmt: skip
        print(f"restore (raw, {restored.bytes_written / MiB:.0f} MiB of data): {restore_s:.2f} s "
              f"= {restored.bytes_written / MiB / restore_s:.0f} MiB/s; "
              f"cp of the {alloc / MiB:.0f} MiB image: "
              f"{cp_s:.2f} s = {alloc / MiB / cp_s:.0f} MiB/s; restore/cp throughput "
              f"{(restored.bytes_written / restore_s) / (alloc / cp_s):.2f}x; restored image "
              f"{'equals' if same else 'DIFFERS FROM'} the disk")  # fmt: skip
        manifest_sizes()
    finally:
        vm.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
