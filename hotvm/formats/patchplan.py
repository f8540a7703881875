"""Whole chunk or patches: what an incremental export stores for a 4 MiB chunk the dirty bitmap touched.

A database VM writes small blocks all over its disk; storing the whole 4 MiB chunk for every 64 KiB it
touched costs 24-45x what changed. Where only a little of a chunk changed since the parent set, the new set
keeps the parent's chunk (its base) and stores the changed ranges as patches: content-addressed objects in
the same chunk store, so they dedup across VMs and weeks like chunks do.

The plan keeps a chunk's patches sorted and non-overlapping: a new dirty range that touches an older patch
takes that patch's range in (it is read again, whole), older patches it does not touch are kept by name.
What a reader composes per chunk stays bounded: once a chunk's patches cover more than MAX_PATCH_FRACTION
of it, or number more than MAX_PATCHES_PER_CHUNK, it is stored whole again (and its patches dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

from hotvm.formats.manifest import Patch, Piece

MAX_PATCH_FRACTION = 0.25
"""Patched bytes of a chunk beyond which it is stored whole: a restore reads at most 1.25x a chunk."""
MAX_PATCHES_PER_CHUNK = 4
"""Patches beyond which a chunk is stored whole: a restore fetches at most 5 objects per chunk, and a 1 TiB
disk's manifest stays below 140 MB even with every chunk at the cap (23 MB without patches; measured by
bench/incremental.py)."""


@dataclass(frozen=True)
class ChunkPlan:
    """For one dirty chunk: `whole` (read and store it whole), or read `ranges` (chunk-relative
    (offset, length), sorted, disjoint) as new patches and keep the parent's `base` and `kept` patches."""

    whole: bool
    base: str | None = None
    kept: tuple[Patch, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()


WHOLE = ChunkPlan(whole=True)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) ranges merged where they overlap or touch."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def plan_chunk(previous: Piece | None, dirty: list[tuple[int, int]], length: int) -> ChunkPlan:
    """The plan for a chunk of `length` bytes whose parent entry is `previous` (None: it was all zeros)
    and whose dirty extents are `dirty` (chunk-relative (offset, length))."""
    wanted = _merge([(max(0, o), min(length, o + n)) for o, n in dirty if n > 0 and o < length and o + n > 0])
    if not wanted:
        return WHOLE
    old = list(previous.patches) if previous else []
    while True:  # take in every older patch a new range touches (its range is read again, whole)
        grown = _merge(wanted + [(p.offset, p.offset + p.length) for p in old if _touches(p, wanted)])
        if grown == wanted:
            break
        wanted = grown
    kept = tuple(p for p in old if not _touches(p, wanted))
    patched = sum(e - s for s, e in wanted) + sum(p.length for p in kept)
    if patched > MAX_PATCH_FRACTION * length or len(wanted) + len(kept) > MAX_PATCHES_PER_CHUNK:
        return WHOLE
    return ChunkPlan(
        whole=False,
        base=previous.base if previous else None,
        kept=kept,
        ranges=tuple((s, e - s) for s, e in wanted),
    )


def _touches(patch: Patch, ranges: list[tuple[int, int]]) -> bool:
    return any(patch.offset < e and s < patch.offset + patch.length for s, e in ranges)


def by_chunk(extents: list[tuple[int, int]], chunk_size: int) -> dict[int, list[tuple[int, int]]]:
    """Dirty (start, length) disk extents split into chunk-relative (offset, length) ones, per chunk index."""
    out: dict[int, list[tuple[int, int]]] = {}
    for start, length in extents:
        pos, end = max(0, start), start + length
        while pos < end:
            index, within = divmod(pos, chunk_size)
            n = min(chunk_size - within, end - pos)
            out.setdefault(index, []).append((within, n))
            pos += n
    return out
