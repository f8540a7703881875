"""Instant restore: time to the demo guest's heartbeat from the backup set vs full restore + boot, and the
stream's throughput vs `hotvm restore`.

    .venv/bin/python bench/instant.py [--sizes 1,4,16] [--fill 0.125] [--variants-size 4]

For each disk size (GiB): a raw image whose first MiB is the demo guest's (empty) ring and FILL of the rest
random data in 4 MiB extents spread over the whole disk (the rest never written: zero, as on a real thin
disk), backed up to a local repository (4 MiB chunks). Then, caches dropped before each:
  local boot    the guest booted from the image itself (the floor: boot time from a local disk)
  full          `hotvm restore` (restore_disk, raw) then boot: the restore time grows with the data
  instant       overlay + nbdkit export + VM started, until the heartbeat (while the stream runs),
                then the stream to completion (block-stream, the guest running)
Goals (issue #17): instant time flat in the disk size and <= 1.5x the local boot; stream >= 0.8x the
throughput of `hotvm restore`. "qemu-nbd stream" is QEMU's own ceiling: the same block-stream from qemu-nbd
serving the raw source image (no chunks, no verification, no Python). At --variants-size, the
alternatives behind the design (docs/instant.md):
no read-ahead in the plugin, and the `noextents` filter (no zero map from the chunk index).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_caches, machine_load, median  # noqa: E402

from hotvm.bootcheck import boot_disks  # noqa: E402
from hotvm.config import BootCheckSpec, Config, TargetConfig  # noqa: E402
from hotvm.formats.export import export_image  # noqa: E402
from hotvm.formats.manifest import Manifest  # noqa: E402
from hotvm.formats.repository import Repository, new_backup_id  # noqa: E402
from hotvm.formats.restore import restore_disk  # noqa: E402
from hotvm.guest.artifacts import ensure_guest_files  # noqa: E402
from hotvm.guest.qemu import BASE_APPEND, MEMORY_MB  # noqa: E402
from hotvm.instant import core, runner  # noqa: E402
from hotvm.instant.export import stop_export  # noqa: E402
from targets import open_target  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 4 * MiB
READY = r"HOTVM-HEARTBEAT seq=\d+"


def make_image(path: Path, size: int, fill: float) -> int:
    """Random 4 MiB extents every CHUNK/fill bytes after the first 4 MiB (the ring stays empty)."""
    written, step = 0, int(CHUNK / fill)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in range(4 * MiB, size, step):
            fh.seek(offset)
            n = min(CHUNK, size - offset)
            fh.write(os.urandom(n))
            written += n
    return written


def back_up(work: Path, image: Path, spec: BootCheckSpec) -> tuple[Config, Manifest]:
    target = TargetConfig(name="bench", url=f"file://{work}/target")
    repo = Repository(open_target(target))
    repo.ensure()
    backup_id = new_backup_id()
    record = export_image(repo, device="data", image=str(image), fmt="raw", chunk_size=CHUNK)
    now = dt.datetime.now(dt.UTC)
    manifest = Manifest(backup_id=backup_id, vm="bench", host="bench", driver="qemu", disks=[record],
                        started_at=now, completed_at=now, boot_check=spec)  # fmt: skip
    repo.commit_manifest(manifest)
    cfg = Config.model_validate({"hosts": [{"name": "h", "vms": []}], "targets": [target.model_dump()]})
    return cfg, manifest


def local_boot(spec: BootCheckSpec, image: Path, work: Path) -> float:
    (work / "local-serial.log").unlink(missing_ok=True)  # else the last boot's heartbeat counts at once
    drop_caches()
    result = boot_disks(spec, [(str(image), "raw")], work / "local-serial.log")
    assert result.ok, result.detail
    return result.seconds


def full_restore_and_boot(
    cfg: Config, manifest: Manifest, spec: BootCheckSpec, work: Path
) -> tuple[float, float]:
    dest = work / "full.raw"
    dest.unlink(missing_ok=True)
    drop_caches()
    repo = Repository(open_target(cfg.targets[0]))
    start = time.perf_counter()
    restore_disk(repo, manifest.disks[0], dest, "raw")
    restored = time.perf_counter() - start
    (work / "full-serial.log").unlink(missing_ok=True)
    result = boot_disks(spec, [(str(dest), "raw")], work / "full-serial.log")
    assert result.ok, result.detail
    dest.unlink()
    return restored, restored + result.seconds


def instant(cfg: Config, manifest: Manifest, work: Path, tuning: dict | None = None,
            start: bool = True) -> tuple[float, float]:  # fmt: skip
    """Seconds to the heartbeat from the start of the restore (what `restore --instant --start` does: the
    stream starts once the guest is up), and the stream's seconds (the guest running). start=False: no
    VM, qemu-storage-daemon streams (the throughput figure)."""
    to = Path(tempfile.mkdtemp(dir=work, prefix="instant-"))
    drop_caches()
    begin = time.perf_counter()
    state = core.prepare(cfg, "bench", to, manifest.backup_id, start=start)
    try:
        core.expose(cfg, state, tuning=tuning)
        launched = core.run(state)
        assert launched is not None
        if start:
            core.wait_ready(state, launched)
        ready = time.perf_counter() - begin
        stream_start = time.perf_counter()
        core.start_stream(state)
        core.wait_stream(state)
        return ready, time.perf_counter() - stream_start
    finally:
        runner.stop(state)
        stop_export(Path(state.run_dir))
        for f in to.glob("*.qcow2"):
            f.unlink()


def block_stream_ceiling(image: Path, work: Path) -> float:
    """Seconds for block-stream (qemu-storage-daemon) from qemu-nbd serving the raw image itself: what
    QEMU's stream costs with no hotvm in the path (no chunks, no verification, no Python)."""
    import json
    import subprocess

    from hotvm.hypervisors.qmp import Monitor

    run = Path(tempfile.mkdtemp(dir=work, prefix="ceiling-"))
    sock, qmp, overlay = run / "nbd.sock", run / "qmp.sock", run / "ov.qcow2"
    nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-r", "-k", str(sock), "-x", "data", "--persistent",
                            str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not sock.exists():
            time.sleep(0.05)
        backing = {"driver": "raw", "file": {"driver": "nbd", "server": {"type": "unix", "path": str(sock)},
                                             "export": "data"}}  # fmt: skip
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "json:" + json.dumps(backing),
                        "-F", "raw", str(overlay), str(image.stat().st_size)], check=True)  # fmt: skip
        node = {"driver": "qcow2", "node-name": "ov", "file": {"driver": "file", "filename": str(overlay)}}
        subprocess.run(["qemu-storage-daemon", "--blockdev", json.dumps(node), "--chardev",
                        f"socket,path={qmp},server=on,wait=off,id=m", "--monitor", "chardev=m",
                        "--pidfile", str(run / "qsd.pid"), "--daemonize"], check=True)  # fmt: skip
        drop_caches()
        mon = Monitor(qmp, "ceiling")
        start = time.perf_counter()
        mon.cmd("block-stream", {"job-id": "j", "device": "ov", "auto-dismiss": False})
        while mon.cmd("query-jobs")[0]["status"] != "concluded":
            time.sleep(0.02)
        took = time.perf_counter() - start
        mon.cmd("quit")
        mon.close()
        return took
    finally:
        nbd.terminate()
        nbd.wait()
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,4,16", help="disk sizes in GiB")
    parser.add_argument("--fill", type=float, default=0.125, help="fraction of the disk holding random data")
    parser.add_argument("--variants-size", type=int, default=4, help="GiB disk for the design alternatives")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per size (medians)")
    args = parser.parse_args()
    os.environ.setdefault("HOTVM_INSTANT_INDEX", tempfile.mkdtemp(prefix="hotvm-bench-index-"))
    work = Path(tempfile.mkdtemp(prefix="hotvm-bench-instant-", dir="/var/tmp"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    files = ensure_guest_files(work / "vms")
    spec = BootCheckSpec(ready_pattern=READY, timeout_s=300, memory_mb=MEMORY_MB, kernel=files.kernel,
                         initrd=files.initramfs, append=BASE_APPEND)  # fmt: skip
    print(f"# {machine_load()}; work dir {work}; fill {args.fill:.3f} random, rest zero; TCG")
    print(f"{'disk':>6} {'data':>7} {'local boot':>10} {'full+boot':>9} {'instant':>8} {'inst/local':>10} "
          f"{'restore':>8} {'stream':>7} {'restore/stream':>14} {'stream+VM':>9} "
          f"{'qemu-nbd stream':>15}")  # fmt: skip
    rows = {}
    for size_gib in (int(s) for s in args.sizes.split(",")):
        image = work / f"disk-{size_gib}.raw"
        data = make_image(image, size_gib * GiB, args.fill)
        cfg, manifest = back_up(work / f"repo-{size_gib}", image, spec)
        locals_, fulls, runs, streams = [], [], [], []
        for _ in range(args.repeat):  # interleaved: the machine's load drifts, the ratios must not
            locals_.append(local_boot(spec, image, work))
            runs.append(instant(cfg, manifest, work))
            fulls.append(full_restore_and_boot(cfg, manifest, spec, work))
            streams.append(instant(cfg, manifest, work, start=False)[1])
        local, restored, full = median(locals_), median([f[0] for f in fulls]), median([f[1] for f in fulls])
        ready, with_vm = median([r[0] for r in runs]), median([r[1] for r in runs])
        stream = median(streams)
        ceiling = median([block_stream_ceiling(image, work) for _ in range(args.repeat)])
        rows[size_gib] = (cfg, manifest)
        print(f"{size_gib:>4}Gi {data / MiB:>5.0f}Mi {local:>9.2f}s {full:>8.2f}s {ready:>7.2f}s "
              f"{ready / local:>9.2f}x {restored:>7.2f}s {stream:>6.2f}s {restored / stream:>13.2f}x "
              f"{with_vm:>8.2f}s {ceiling:>14.2f}s", flush=True)  # fmt: skip
        image.unlink()
    if args.variants_size in rows:
        cfg, manifest = rows[args.variants_size]
        print(f"# design alternatives at {args.variants_size} GiB")
        for name, tuning in (("chosen: read-ahead 4, holes", None), ("no read-ahead", {"read_ahead": 0}),
                             ("holes flagged zero", {"zero_flag": True}),
                             ("noextents filter", {"filters": ["noextents"]})):  # fmt: skip
            ready, _ = instant(cfg, manifest, work, tuning)
            _, stream = instant(cfg, manifest, work, tuning, start=False)
            print(f"  {name:<32} ready {ready:6.2f}s  stream (no VM) {stream:6.2f}s", flush=True)


if __name__ == "__main__":
    main()
