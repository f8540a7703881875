"""Immutable sets on targets with S3 Object Lock (`immutable_days`), plain Python.

Every object a backup or a copy writes is locked by the target itself (targets/s3.py). What is left here:
- chunks are shared, so a new set that reuses chunks written under an older (earlier-expiring) lock gets
  their locks extended before its manifest is written: a set is never locked longer than its chunks;
- a set's retention is its manifest's retain-until date: prune leaves a set alone until then, check
  reports it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from hotvm.retention import BackupPoint
from targets.base import Target


def locking(target: Target) -> bool:
    return bool(target.object_lock_days)


def protect_chunks(target: Target, chunk_paths: Iterable[str]) -> int:
    """Extend the lock of every chunk a new set references to what a new object gets now; returns how
    many locks were extended (0 on targets without Object Lock)."""
    if not locking(target):
        return 0
    return target.extend_lock(sorted(set(chunk_paths)), target.lock_until())  # type: ignore[attr-defined]


def set_retained_until(target: Target, set_path: str) -> dt.datetime | None:
    """Until when the set at `set_path` (vms/<vm>/<id>, files/<vm>/<id>) is locked: its manifest's
    retain-until date, or its started.json's for an incomplete set; None without Object Lock."""
    if not locking(target):
        return None
    for name in ("manifest.json", "started.json"):
        until = target.retained_until(f"{set_path}/{name}")  # type: ignore[attr-defined]
        if until is not None:
            return until
    return None


def lock_reason(until: dt.datetime | None, now: dt.datetime) -> str | None:
    """The prune reason for a set still locked at `now` (None: not locked, may be removed)."""
    if until is None or until <= now:
        return None
    return f"immutable until {until.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC (S3 Object Lock)"


def with_lock_holds(
    target: Target, points: list[BackupPoint], now: dt.datetime | None = None
) -> list[BackupPoint]:
    """The points, each set still under Object Lock held by its lock (prune never plans to delete it:
    the store would refuse, and the set is meant to survive exactly that)."""
    if not locking(target):
        return points
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for p in points:
        reason = lock_reason(set_retained_until(target, p.path), now) if p.path else None
        out.append(dataclasses.replace(p, hold=p.hold or reason) if reason else p)
    return out


def unlocked(target: Target, paths: list[str], now: dt.datetime) -> tuple[list[str], int]:
    """(the paths whose lock expired or that have none, how many are still locked): the sweep deletes
    only the former."""
    if not locking(target) or not paths:
        return paths, 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        untils = list(pool.map(target.retained_until, paths))  # type: ignore[attr-defined]
    free = [p for p, until in zip(paths, untils, strict=True) if until is None or until <= now]
    return free, len(paths) - len(free)
