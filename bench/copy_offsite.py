"""Replication of a repository (`hotvm copy`) to a destination that already holds half of its chunks, vs
the plain tool uploading exactly the missing files to the same server, in one run.

    .venv/bin/python bench/copy_offsite.py [--size-mib 256] [--rounds 2] [--schemes s3,sftp]

Source: a local file repository with one complete image set of `size` MiB of random data (4 MiB chunks,
nothing compresses or deduplicates), made with the real export path. Destination, per round under a fresh
prefix: the repository marker and every other chunk already there (50 %, written before the clock starts).
  bytes sent / bytes missing   every byte hotvm wrote (counted in the copy engine) over the size of the
                               source files the destination lacked (from listings before the copy);
                               goal <= 1.05 (issue #16)
  throughput                   bytes missing / seconds, hotvm vs the plain tool given the list of missing
                               files (its best case: it needs no listing and verifies nothing); goal >= 0.8x
Plain tools, against the same loopback servers (tests/servers.py):
  s3    boto3 put_object of each missing file, 8 threads (hotvm's --workers default) to moto
  sftp  OpenSSH `sftp -b` (one session, mkdir + put per file)
hotvm reads and verifies (decompress + sha256) every chunk it sends; the plain tool does not.
"""

# ruff: noqa: E402
from __future__ import annotations

import os.path
import sys

# bench/ is on the path as the script's own directory (_common); tests/ for the loopback servers
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import argparse
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import machine_load, median, write_random_extents
from servers import MotoServer, SshServer

from hotvm.config import TargetConfig
from hotvm.copy import copy_repository
from hotvm.formats.export import export_image
from hotvm.formats.manifest import Manifest
from hotvm.formats.repository import MARKER, Repository, new_backup_id
from targets import open_target

BUCKET = "hotvm-bench-copy"
GOAL_BYTES, GOAL_SPEED = 1.05, 0.8


def make_source(work: Path, size_mib: int) -> tuple[Repository, dict[str, int]]:
    """One complete image set; returns the repository and {relative path: size} of every file in it."""
    image = work / "data.raw"
    write_random_extents(str(image), size_mib << 20, 1.0)
    repo = Repository(open_target(TargetConfig(name="primary", url=f"file://{work}/src")))
    now = dt.datetime.now(dt.UTC)
    backup_id = new_backup_id(now)
    repo.mark_started("bench", backup_id, "h1")
    record = export_image(repo, device="data", image=str(image), fmt="raw", frozen_at=now)
    repo.write_disk_record("bench", backup_id, record)
    repo.commit_manifest(Manifest(backup_id=backup_id, vm="bench", host="h1", driver="qemu", disks=[record],
                                  started_at=now, completed_at=dt.datetime.now(dt.UTC)))
    image.unlink()
    root = work / "src"
    return repo, {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def seeded(files: dict[str, int]) -> list[str]:
    """What the destination holds before the copy: the marker and every other chunk (by name)."""
    chunks = sorted(f for f in files if f.startswith("chunks/"))
    return [MARKER, *chunks[::2]]


class S3:
    name = "s3"

    def __init__(self) -> None:
        import boto3

        self.server = MotoServer(auth=False).start()
        self.client = boto3.client("s3", endpoint_url=self.server.endpoint_url, region_name="us-east-1",
                                   aws_access_key_id="bench", aws_secret_access_key="bench")
        self.client.create_bucket(Bucket=BUCKET)

    def config(self, tag: str) -> TargetConfig:
        os.environ["HOTVM_BENCH_S3_KEY"] = os.environ["HOTVM_BENCH_S3_SECRET"] = "bench"
        return TargetConfig(name="offsite", url=f"s3://{BUCKET}/{tag}", endpoint_url=self.server.endpoint_url,
                            access_key_env="HOTVM_BENCH_S3_KEY", secret_key_env="HOTVM_BENCH_S3_SECRET")

    def plain(self, src: Path, names: list[str], tag: str) -> None:
        def put(name: str) -> None:
            self.client.put_object(Bucket=BUCKET, Key=f"{tag}/{name}", Body=(src / name).read_bytes())

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, names))

    def stop(self) -> None:
        self.server.close()


class Sftp:
    name = "sftp"

    def __init__(self) -> None:
        self.server = SshServer().start()

    def config(self, tag: str) -> TargetConfig:
        s = self.server
        return TargetConfig(name="offsite", url=f"sftp://root@127.0.0.1:{s.port}{s.root_dir}/{tag}",
                            key_file=s.client_key, known_hosts=s.known_hosts)

    def plain(self, src: Path, names: list[str], tag: str) -> None:
        s = self.server
        base = f"{s.root_dir}/{tag}"
        dirs = sorted({str(Path(n).parent) for n in names} - {"."})
        lines = [f"-mkdir {base}"] + [f"-mkdir {base}/{d}" for d in _with_parents(dirs)]
        lines += [f"put {src / n} {base}/{n}" for n in names]
        subprocess.run(["sftp", "-q", "-b", "-", "-P", str(s.port), "-i", str(s.client_key),
                        "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "BatchMode=yes", "root@127.0.0.1"],
                       input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)

    def stop(self) -> None:
        self.server.close()


def _with_parents(dirs: list[str]) -> list[str]:
    out: set[str] = set()
    for d in dirs:
        parts = Path(d).parts
        out.update(str(Path(*parts[: i + 1])) for i in range(len(parts)))
    return sorted(out, key=lambda p: (p.count("/"), p))


def seed(dst, src_root: Path, names: list[str]) -> None:  # noqa: ANN001 - Target
    for name in names:
        dst.write_bytes(name, (src_root / name).read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--schemes", default="s3,sftp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hotvm-bench-copy-"))
    try:
        src, files = make_source(work, args.size_mib)
        src_root = work / "src"
        present = seeded(files)
        missing = sorted(set(files) - set(present))
        bytes_missing = sum(files[n] for n in missing)
        chunks = sum(f.startswith("chunks/") for f in files)
        print(f"source: {len(files)} files, {sum(files.values()) / 2**20:.1f} MiB; destination already has "
              f"{len(present) - 1} of {chunks} chunks; missing "
              f"{len(missing)} files, {bytes_missing / 2**20:.1f} MiB")
        print(f"({machine_load()})")
        for name in args.schemes.split(","):
            scheme = {"s3": S3, "sftp": Sftp}[name]()
            try:
                ratios, hot_speeds, plain_speeds = [], [], []
                for rnd in range(args.rounds):
                    tag = f"r{rnd}-{uuid.uuid4().hex[:6]}"
                    dst = open_target(scheme.config(f"hotvm-{tag}"))
                    seed(dst, src_root, present)
                    plain_first = rnd % 2 == 1
                    if plain_first:
                        t0 = time.perf_counter()
                        scheme.plain(src_root, missing, f"plain-{tag}")
                        plain_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    report = copy_repository(src, dst)
                    hot_s = time.perf_counter() - t0
                    if not plain_first:
                        t0 = time.perf_counter()
                        scheme.plain(src_root, missing, f"plain-{tag}")
                        plain_s = time.perf_counter() - t0
                    dst.close()
                    assert report.copied and report.chunks_present == len(present) - 1
                    ratios.append(report.bytes_sent / bytes_missing)
                    hot_speeds.append(bytes_missing / 2**20 / hot_s)
                    plain_speeds.append(bytes_missing / 2**20 / plain_s)
                    print(f"  {name} round {rnd + 1}: hotvm {hot_s:.2f} s ({report.bytes_sent} bytes sent), "
                          f"plain {plain_s:.2f} s")
                ratio, hot, plain = median(ratios), median(hot_speeds), median(plain_speeds)
                print(f"{name}: bytes sent / bytes missing = {ratio:.4f} (goal <= {GOAL_BYTES}) "
                      f"{'OK' if ratio <= GOAL_BYTES else 'MISSED'}; throughput hotvm {hot:.1f} MiB/s vs "
                      f"plain {plain:.1f} MiB/s = {hot / plain:.2f}x (goal >= {GOAL_SPEED}x) "
                      f"{'OK' if hot / plain >= GOAL_SPEED else 'MISSED'}")
            finally:
                scheme.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
