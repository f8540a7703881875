"""Host side of the demo guest's ring: the record format and a checker for disk images.

The guest writes record n (one 4 KiB block) at block n % RING, in order, each write fsync'ed before the
next. So any crash-consistent image of its disk holds one contiguous run of complete records ending at
the newest one; anything else (a torn block, a hole, an old record where a newer one belongs) means the
image is not a point in time of the running guest. That is what a hot backup must preserve, and what
`verify_ring` checks. The guest's shell writer (`hotvm.guest.scripts`) must produce exactly `make_record`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hotvm.child_env import child_env
from hotvm.guest.errors import ImageUnreadable

RING = 256
BLOCK = 4096
RING_BYTES = RING * BLOCK  # the first MiB of the disk; the host may use the rest freely
MAGIC = b"HOTVMREC"
_ZERO_BLOCK = bytes(BLOCK)
_MAX_LISTED = 8  # problems listed one by one before summarising


def fill_byte(seq: int) -> int:
    """Padding byte of record `seq`: non-printable (so `strings` sees only headers) and different from
    the record it overwrites (seq - RING), so a half-written block never looks complete."""
    return 0x80 + seq % 127


def make_record(seq: int) -> bytes:
    """The exact 4 KiB the guest writes for `seq`."""
    header = f"HOTVMREC {seq} {seq}\n".encode()
    return header + bytes([fill_byte(seq)]) * (BLOCK - len(header))


@dataclass(frozen=True)
class RingReport:
    records: int
    """Complete records found."""
    first_seq: int
    """Oldest complete record (0 when there is none)."""
    last_seq: int
    """Newest complete record (0 on a fresh disk): the guest resumes at last_seq + 1."""
    consistent: bool
    problems: list[str] = field(default_factory=list)


def verify_ring(source: str | os.PathLike[str] | bytes | BinaryIO, fmt: str | None = None) -> RingReport:
    """Check the ring of a disk image (path to a raw/qcow2 file), of its first MiB (bytes) or of a reader.

    Paths are read through `qemu-img`, which refuses an image a running QEMU writes to: never check the
    active image of a running VM (its content is changing and, for qcow2, cached in QEMU).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source[:RING_BYTES])
    elif isinstance(source, str | os.PathLike):
        data = read_ring_bytes(Path(source), fmt)
    else:
        data = _read_up_to(source, RING_BYTES)
    return analyse_ring(data)


def analyse_ring(data: bytes) -> RingReport:
    """The checks of `verify_ring`, on the first MiB of a disk."""
    problems: list[str] = []
    seqs: list[int] = []
    for block in range(min(RING, len(data) // BLOCK)):
        chunk = data[block * BLOCK : (block + 1) * BLOCK]
        if chunk == _ZERO_BLOCK:
            continue
        seq, problem = _check_block(block, chunk)
        if problem:
            problems.append(problem)
        else:
            seqs.append(seq)
    if len(data) < RING_BYTES:
        problems.append(f"image holds only {len(data)} bytes, the ring needs {RING_BYTES}")
    seqs.sort()
    if seqs:
        problems += _sequence_problems(seqs)
    problems = _summarise(problems)
    return RingReport(
        records=len(seqs),
        first_seq=seqs[0] if seqs else 0,
        last_seq=seqs[-1] if seqs else 0,
        consistent=not problems,
        problems=problems,
    )


def read_ring_bytes(path: Path, fmt: str | None = None) -> bytes:
    """The first MiB of an image as raw bytes, through qemu-img (format-aware, honours QEMU's locks)."""
    if not path.is_file():
        raise ImageUnreadable(f"disk image {path} does not exist", "check the path")
    info = image_info(path, fmt)
    fmt = fmt or info["format"]
    count = min(RING, int(info["virtual-size"]) // BLOCK)
    if count == 0:
        return b""
    with tempfile.TemporaryDirectory(prefix="hotvm-ring-") as tmp:
        out = Path(tmp) / "ring.raw"
        opts = [f"bs={BLOCK}", f"count={count}", f"if={path}", f"of={out}"]
        _run_qemu_img(["qemu-img", "dd", "-f", fmt, "-O", "raw", *opts], path)
        return out.read_bytes()[: count * BLOCK]


def image_info(path: Path, fmt: str | None = None) -> dict:
    """`qemu-img info` as JSON; fails (ImageUnreadable) on an image a running QEMU writes to."""
    cmd = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    return json.loads(_run_qemu_img(cmd, path))


def _run_qemu_img(cmd: list[str], path: Path) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
    except FileNotFoundError as exc:
        raise ImageUnreadable("qemu-img is not installed", "apt-get install qemu-utils") from exc
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "lock" in err:
            raise ImageUnreadable(f"{path} is in use by a running QEMU", "stop the VM or check a copy of it")
        detail = err or f"exit {proc.returncode}"
        raise ImageUnreadable(f"cannot read {path}: {detail}", "is it a disk image?")
    return proc.stdout


def _read_up_to(reader: BinaryIO, size: int) -> bytes:
    buf = io.BytesIO()
    while buf.tell() < size:
        chunk = reader.read(size - buf.tell())
        if not chunk:
            break
        buf.write(chunk)
    return buf.getvalue()


def _check_block(block: int, chunk: bytes) -> tuple[int, str]:
    """(seq, "") for a complete record in its right place, else (-1, what is wrong)."""
    if not chunk.startswith(MAGIC + b" "):
        return -1, f"block {block}: not a ring record (foreign or corrupt data)"
    header = chunk[: chunk.find(b"\n")] if b"\n" in chunk[:64] else b""
    parts = header.split(b" ")
    if len(parts) != 3 or not parts[1].isdigit() or parts[1] != parts[2]:
        return -1, f"block {block}: damaged record header {chunk[:40]!r}"
    seq = int(parts[1])
    if seq < 1 or seq % RING != block:
        return -1, f"block {block}: holds seq {seq}, which belongs in block {seq % RING}"
    if chunk != make_record(seq):
        return -1, f"block {block}: record {seq} is torn (padding does not match its seq)"
    return seq, ""


def _sequence_problems(seqs: list[int]) -> list[str]:
    """Records must be one run ending at the newest, as long as the ring allows."""
    last = seqs[-1]
    present = set(seqs)
    missing = [s for s in range(max(1, last - RING + 1), last + 1) if s not in present]
    if not missing:
        return []
    return [f"records missing before seq {last}: {_ranges(missing)} (not a point in time)"]


def _ranges(values: list[int]) -> str:
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    text = [str(a) if a == b else f"{a}-{b}" for a, b in spans[:_MAX_LISTED]]
    more = f" (+{len(spans) - _MAX_LISTED} more)" if len(spans) > _MAX_LISTED else ""
    return ", ".join(text) + more


def _summarise(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return problems[:_MAX_LISTED] + [f"... and {len(problems) - _MAX_LISTED} more problems"]
