"""Client CPU (user and system, separately) of a put by two hotvm checkouts to one server, alternating.

    .venv/bin/python bench/put_cpu_ab.py --a /path/to/main --b . [--schemes smb,file,ftp,sftp] [--rounds 6]

Each round exports the same 512 MiB raw image of random data (`--size-mib`) once with each checkout, in a
child process with PYTHONPATH set to that checkout (the order swaps every round), into a fresh prefix on
the same loopback server (bench/target_throughput.py's schemes), and reads the child's own user and
system CPU around `export_image`. Unlike target_throughput's client CPU this leaves out `sync` (which
also flushes whatever other processes left dirty) and splits user from system time: on this shared
2-core machine a change of 0.1 s per 512 MiB shows only here. Prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import target_throughput as tt  # noqa: E402

CHILD = """
import json, os, sys, time
from hotvm.config import TargetConfig
from hotvm.formats.export import export_image
from hotvm.formats.repository import Repository
from targets import open_target
target = open_target(TargetConfig.model_validate_json(sys.argv[1]))
repo = Repository(target)
repo.ensure()
before, start = os.times(), time.monotonic()
export_image(repo, device="b", image=sys.argv[2], fmt="raw")
after, wall = os.times(), time.monotonic() - start
target.close()
print(json.dumps({"user": after.user - before.user, "sys": after.system - before.system, "wall": wall}))
"""
SCHEMES = {"file": tt.FileScheme, "smb": tt.SmbScheme, "ftp": tt.FtpScheme, "sftp": tt.SftpScheme}


def run(scheme: tt.Scheme, checkout: str, image: Path) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    subprocess.run(["sync"], check=True)
    env = {**os.environ, "PYTHONPATH": checkout}
    command = [sys.executable, "-c", CHILD, scheme.config(tag).model_dump_json(), str(image)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=checkout, env=env)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr}")
    scheme.cleanup(tag)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--schemes", default="smb,file,ftp,sftp")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size-mib", type=int, default=512)
    args = parser.parse_args()
    checkouts = {"A": str(Path(args.a).resolve()), "B": str(Path(args.b).resolve())}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        image = work / "random.img"
        tt.write_random_extents(str(image), args.size_mib << 20, 1.0)
        print(f"{args.size_mib} MiB of random data, {args.rounds} rounds, medians; {tt.machine_load()}")
        for name in args.schemes.split(","):
            scheme = SCHEMES[name](work)
            scheme.start()
            rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
            try:
                for r in range(args.rounds):
                    for label in ("A", "B") if r % 2 == 0 else ("B", "A"):
                        rows[label].append(run(scheme, checkouts[label], image))
            finally:
                scheme.stop()
            gib = args.size_mib / 1024
            med = {k: {m: statistics.median(x[m] for x in v) for m in ("user", "sys", "wall")}
                   for k, v in rows.items()}  # fmt: skip
            client = {k: m["user"] + m["sys"] for k, m in med.items()}
            for label, m in med.items():
                print(f"{name:4s} {label} user {m['user']:.2f} s  sys {m['sys']:.2f} s  client "
                      f"{client[label] / gib:.2f} s/GiB  wall {m['wall']:.2f} s  ({checkouts[label]})")
            print(f"{name:4s} B/A user {med['B']['user'] / med['A']['user']:.2f}x  "
                  f"client {client['B'] / client['A']:.2f}x")


if __name__ == "__main__":
    main()
