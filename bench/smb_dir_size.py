"""smbd CPU per chunk write against the number of files already in the chunk's directory.

    .venv/bin/python bench/smb_dir_size.py [--entries 0,1000,10000] [--writes 300] [--rounds 2]

Each write is `Target.write_bytes` of a 1-byte blob into a directory pre-filled (on the server's disk) with
N files named like chunks: what a chunk write costs the server besides its bytes (CREATE of a temporary
name, WRITE, SET_INFO rename over the final name, CLOSE). Samba's default `case sensitive = auto` makes it
read the whole directory for every name it does not find (the temporary name, the rename target), so the
cost grows with the directory. Figures: docs/benchmarks.md ("a chunk's SMB requests ...").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from _common import machine_load, median, process_cpu  # noqa: E402
from servers import SambaServer, _descendants  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from targets import open_target  # noqa: E402


def smbd_cpu(server: SambaServer) -> float:
    pid = server.proc.pid
    return process_cpu(pid) + sum(process_cpu(child) for child in _descendants(pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="0,1000,10000")
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server = SambaServer().start()
    os.environ["HOTVM_BENCH_SMB_PASSWORD"] = server.password
    results: dict[int, list[float]] = {}
    try:
        target = open_target(TargetConfig(
            name="bench-smb", url=f"smb://{server.user}@127.0.0.1:{server.port}/{server.share}/dirsize",
            password_env="HOTVM_BENCH_SMB_PASSWORD"))
        try:
            for _ in range(args.rounds):
                for entries in (int(n) for n in args.entries.split(",")):
                    folder = f"d-{uuid.uuid4().hex[:8]}"
                    target.write_bytes(f"{folder}/first", b"x")
                    on_disk = server.share_dir / "dirsize" / folder
                    for i in range(entries):
                        (on_disk / f"{i:064x}").touch()
                    start = smbd_cpu(server)
                    for _ in range(args.writes):
                        target.write_bytes(f"{folder}/{uuid.uuid4().hex}", b"x")
                    time.sleep(0.2)  # smbd's last replies are sent before its counters are read
                    results.setdefault(entries, []).append((smbd_cpu(server) - start) / args.writes * 1e3)
        finally:
            target.close()
    finally:
        server.close()
    print(f"smbd CPU per chunk write (1 byte), median of {args.rounds} round(s); {machine_load()}")
    for entries, values in results.items():
        print(f"  {entries:6d} files in the directory: {median(values):5.2f} ms "
              f"({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
