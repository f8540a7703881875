"""The FTP target alone, storing chunks the way export does, against another version of targets/ftp.py in the
same run: what the per-chunk commands cost the client and the (loopback) server.

    .venv/bin/python bench/ftp_chunks.py --before /tmp/ftp_main.py [--chunks 256] [--size-kib 64]
                                         [--rounds 7] [--workers 4] [--ftp-server pyftpdlib|vsftpd]
                                         [--fill 0]

(`git show main:targets/ftp.py > /tmp/ftp_main.py`.) Each round stores `--chunks` blobs of random names as
export does (inside grouped("chunks/"): exists_for_write, then write_bytes), `--workers` threads, in two
settings: a fresh repository (every chunk directory made by the run) and existing chunk directories (a later
run: all 256 are there, each holding `--fill` chunks already, as in a repository that has some). Before
and after alternate; medians. Small blobs make the commands dominate. The server's CPU includes its
per-connection processes (vsftpd runs under `servers.py reap`, see bench/target_throughput.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]
from _common import process_cpu  # noqa: E402
from servers import FtpServer, VsftpdServer, _descendants  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from targets.base import Target  # noqa: E402

Opener = Callable[[TargetConfig], Target]


def load(path: Path, name: str) -> Opener:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.open_ftp


def server_cpu(server: FtpServer | VsftpdServer) -> float:
    assert server.proc is not None
    deadline = time.monotonic() + 5
    while len(_descendants(server.proc.pid)) > 1 and time.monotonic() < deadline:  # sessions still ending
        time.sleep(0.02)
    return sum(process_cpu(pid) for pid in (server.proc.pid, *_descendants(server.proc.pid)))


def store_chunks(opener: Opener, server: FtpServer | VsftpdServer, prefix: str, blobs: list[bytes],
                 chunks: int, workers: int) -> None:
    target = opener(TargetConfig(name="bench-ftp", url=f"ftp://{server.user}@127.0.0.1:{server.port}/{prefix}",
                                 password_env="HOTVM_BENCH_FTP_PASSWORD"))
    target._makedirs(target.root)  # noqa: SLF001 - as repo.ensure() would have
    names = [uuid.uuid4().hex * 2 for _ in range(chunks)]

    def one(i: int) -> None:
        path = f"chunks/{names[i][:2]}/{names[i]}"
        if not target.exists_for_write(path):
            target.write_bytes(path, blobs[i % len(blobs)])

    try:
        with target.grouped("chunks/"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(chunks)))
    finally:
        target.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, type=Path, help="an older targets/ftp.py")
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--size-kib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ftp-server", choices=["pyftpdlib", "vsftpd"], default="pyftpdlib")
    parser.add_argument("--fill", type=int, default=0, help="chunks already in each existing directory")
    args = parser.parse_args()
    openers = {"before": load(args.before, "ftp_before"), "after": load(HERE.parent / "targets" / "ftp.py",
                                                                        "ftp_after")}
    blobs = [os.urandom(args.size_kib << 10) for _ in range(8)]
    server = VsftpdServer() if args.ftp_server == "vsftpd" else FtpServer()
    server.reap_all = True
    with server:
        os.environ["HOTVM_BENCH_FTP_PASSWORD"] = server.password
        existing = openers["after"](TargetConfig(
            name="bench-ftp", url=f"ftp://{server.user}@127.0.0.1:{server.port}/existing",
            password_env="HOTVM_BENCH_FTP_PASSWORD"))
        for i in range(256):
            existing._makedirs(existing.full(f"chunks/{i:02x}"))  # noqa: SLF001
        existing.close()
        for i in range(256):
            for j in range(args.fill):
                name = f"{i:02x}{j:062x}"
                (server.root_dir / "existing" / "chunks" / name[:2] / name).write_bytes(b"")
        if isinstance(server, VsftpdServer):
            subprocess.run(["chown", "-R", server.user, str(server.root_dir)], check=True)
        runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        order = [(setting, kind) for setting in ("fresh", "existing") for kind in ("before", "after")]
        for r in range(args.rounds):
            for setting, kind in order if r % 2 == 0 else reversed(order):
                prefix = f"fresh-{uuid.uuid4().hex[:8]}" if setting == "fresh" else "existing"
                t, s0, w0 = os.times(), server_cpu(server), time.perf_counter()
                store_chunks(openers[kind], server, prefix, blobs, args.chunks, args.workers)
                wall, t1 = time.perf_counter() - w0, os.times()
                client = t1.user + t1.system - t.user - t.system
                runs.setdefault((setting, kind), []).append((wall, client, server_cpu(server) - s0))
    print(f"{args.ftp_server}: {args.chunks} chunks of {args.size_kib} KiB, {args.workers} workers, "
          f"{args.fill} already in each existing directory, medians of {args.rounds}; per chunk:")
    for (setting, kind), values in sorted(runs.items()):
        wall, client, srv = (statistics.median(v[j] for v in values) * 1e3 / args.chunks for j in range(3))
        print(f"  {setting:<8} {kind:<6}  wall {wall:5.2f} ms  client cpu {client:4.2f} ms  "
              f"server cpu {srv:4.2f} ms")


if __name__ == "__main__":
    main()
