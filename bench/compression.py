"""What compress_chunk stores for a realistic guest disk, what it costs, and what its sampling misses.

    PYTHONPATH=. .venv/bin/python bench/compression.py [--image ROOTFS.img] [--size-gib 2] [--rounds 3]

1. A guest root file system: an ext4 image made with `mkfs.ext4 -d` from this machine's own /usr/bin,
   /usr/sbin, /usr/lib/python3.*, /usr/share/{doc,man,locale}, /usr/include, /var/lib/dpkg and up to
   300 MB of /var/cache/apt/archives (packages: already compressed), ~1.2 GB in a 2 GiB image (or
   `--image`, any raw image). It is exported into a fresh file:// repository each round, warm (the
   export's CPU is what changes here): stored bytes, chunks stored as raw-block frames, export CPU (user
   + sys) per GiB read. Run it once with PYTHONPATH set to each checkout to compare two hotvms: the
   stored bytes must not grow where a hotvm skips the compressor.
2. Sampling (needs a hotvm with export.worth_compressing): per-chunk cost of the test on random, text
   and binary 4 MiB chunks, and the chunks it stores raw among random chunks with a run of Python
   source at a random place (2-12.5 % of the chunk): the worst size lost against zstd on the whole chunk.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from hotvm.formats import export  # noqa: E402
from hotvm.formats.rawframe import raw_layout  # noqa: E402
from hotvm.formats.repository import Repository  # noqa: E402
from targets import open_target  # noqa: E402

MiB = 1 << 20
TREES = ["usr/bin", "usr/sbin", *[p[1:] for p in glob.glob("/usr/lib/python3.*")], "usr/share/doc",
         "usr/share/man", "usr/share/locale", "usr/include", "var/lib/dpkg"]  # fmt: skip
DEBS = 300_000_000


def build_rootfs(work: Path, size_gib: float) -> Path:
    """A guest-like ext4 image of this machine's own files (hard links into a staging tree: no copy)."""
    stage = work / "stage"
    for tree in TREES:
        if Path("/", tree).is_dir():
            (stage / tree).parent.mkdir(parents=True, exist_ok=True)
            if subprocess.run(["cp", "-al", f"/{tree}", str(stage / tree)], capture_output=True).returncode:
                subprocess.run(["cp", "-a", f"/{tree}", str(stage / tree)], check=True)
    archives = stage / "var/cache/apt/archives"
    archives.mkdir(parents=True)
    total = 0
    for deb in sorted(glob.glob("/var/cache/apt/archives/*.deb")):
        total += os.path.getsize(deb)
        if total > DEBS:
            break
        shutil.copy(deb, archives)
    image = work / "rootfs.img"
    size = f"{int(size_gib * 1024)}M"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(stage), str(image), size], check=True)
    shutil.rmtree(stage)
    return image


def export_round(work: Path, image: Path, n: int) -> tuple[int, int, int, float, int]:
    """(stored bytes, chunks, chunks stored raw, CPU seconds, bytes read) of one export."""
    root = work / f"repo{n}"
    repo = Repository(open_target(TargetConfig(name="t", url=f"file://{root}")))
    repo.ensure()
    cpu = time.process_time()
    record = export.export_image(repo, device="d", image=str(image), fmt="raw")
    cpu = time.process_time() - cpu
    raw = 0
    for index, digest in record.chunks:
        frame = Path(repo.target.full(repo.chunk_path(digest))).read_bytes()
        raw += raw_layout(frame[:32], len(frame), record.chunk_length(index)) is not None
    shutil.rmtree(root)
    return record.bytes_new, len(record.chunks), raw, cpu, record.bytes_read


def sampling() -> None:
    worth = getattr(export, "worth_compressing", None)
    if worth is None:
        print("sampling: this hotvm compresses every chunk (no export.worth_compressing)")
        return
    chunk = 4 * MiB
    text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))[: 8 * MiB]
    binary = b"".join(Path(p).read_bytes() for p in sorted(glob.glob("/usr/bin/*"))[:400]
                      if os.path.isfile(p))[:chunk]  # fmt: skip
    zstd = zstandard.ZstdCompressor(level=export.ZSTD_LEVEL)
    for name, data in (("random", os.urandom(chunk)), ("text", text[:chunk]), ("binary", binary)):
        view = memoryview(data)
        best = min(_cpu(lambda v=view: worth(v)) for _ in range(7))
        full = min(_cpu(lambda d=data: zstd.compress(d)) for _ in range(3))
        print(f"sampling {name:7s} chunk: {best * 1e3:.3f} ms (zstd -{export.ZSTD_LEVEL} on all of it: "
              f"{full * 1e3:.2f} ms, {len(zstd.compress(data)) / chunk:.3f} of its size)")  # fmt: skip
    rng = random.Random(1)
    for frac in (0.02, 0.03, 0.045, 0.06, 0.09, 0.125):
        missed, worst = 0, 0.0
        for _ in range(12):
            length = int(chunk * frac)
            at = rng.randrange(chunk - length)
            mixed = bytearray(os.urandom(chunk))
            start = rng.randrange(len(text) - length)
            mixed[at : at + length] = text[start : start + length]
            if not worth(memoryview(mixed)):
                missed += 1
                worst = max(worst, (chunk + 105 - len(zstd.compress(mixed))) / chunk)
        print(f"random chunk with {frac * 100:4.1f} % Python source: stored raw {missed}/12, worst loss "
              f"{worst * 100:.1f} % of the chunk")  # fmt: skip


def _cpu(fn) -> float:
    start = time.thread_time()
    for _ in range(10):
        fn()
    return (time.thread_time() - start) / 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default=None, help="a raw image to export (default: build a rootfs)")
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hotvm-compression-", dir=args.dir or "/var/tmp"))
    try:
        image = Path(args.image) if args.image else build_rootfs(work, args.size_gib)
        rounds = [export_round(work, image, n) for n in range(args.rounds)]
        stored, chunks, raw, _, read = rounds[-1]
        cpu = median([r[3] for r in rounds])
        print(f"hotvm {export.__file__}")
        print(f"image {image.name}: {read / MiB:.0f} MiB allocated, {chunks} chunks, "
              f"{raw} stored as raw frames")
        print(f"stored {stored} bytes ({stored / read:.4f} of what was read); export CPU {cpu:.2f} s "
              f"({cpu / (read / (1 << 30)):.2f} s/GiB), median of {args.rounds}")  # fmt: skip
        sampling()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
