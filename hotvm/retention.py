"""Which backup sets to keep: pure decisions over plain data, no I/O (hotvm/prune.py does the deleting).

Semantics follow restic's `forget` / borg's `prune`, per VM:
  last N      the N newest complete sets
  days N      every complete set younger than N days (measured from `now`)
  daily N     the newest complete set of each of the N newest days that have one; weekly (ISO weeks: a week
              that spans New Year belongs to the ISO year of its Thursday), monthly, yearly alike
A set is kept if any rule keeps it, and its reasons list every rule that did. Rules count independently.

Safety rules that no policy overrides:
  - only complete sets (manifest present and readable) count towards any number: a failed or partial run
    never rotates a good backup out;
  - the newest complete set of a VM is always kept: a VM whose backups stopped (or a days-only policy) is
    never left with nothing;
  - an incomplete set (running, failed or killed) is kept while anything was written to it within the
    grace period (it may still be running, or be resumed); older, it is a leftover and goes;
  - a set whose manifest exists but cannot be read is kept (written by a newer hotvm? damaged?): prune never
    decides about what it cannot read; `hotvm check` reports it;
  - a set with a `hold` (e.g. a tape copy reading it) is kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import ValidationError

from hotvm.config import Keep
from hotvm.errors import ConfigError

DEFAULT_INCOMPLETE_GRACE = dt.timedelta(hours=24)


class SetState(StrEnum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    """No manifest: a backup that is running, failed or was killed."""
    DAMAGED = "damaged"
    """A manifest that cannot be read."""


@dataclass(frozen=True)
class BackupPoint:
    vm: str
    backup_id: str
    state: SetState
    time: dt.datetime
    """Complete: when the set was completed. Otherwise: the last sign of life (newest write into the set)."""
    hold: str | None = None
    """Why this set must stay whatever the policy says (a tape copy still reads it, ...)."""
    path: str = ""
    """Where the set lives on the target (for the code that deletes it; ignored here)."""


@dataclass(frozen=True)
class Decision:
    point: BackupPoint
    keep: bool
    reasons: list[str]


def _day(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d}"


def _iso_week(t: dt.datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: dt.datetime) -> str:
    return f"{t:%Y-%m}"


def _year(t: dt.datetime) -> str:
    return f"{t:%Y}"


BUCKETS: tuple[tuple[str, Callable[[dt.datetime], str]], ...] = (
    ("daily", _day),
    ("weekly", _iso_week),
    ("monthly", _month),
    ("yearly", _year),
)


def aware(t: dt.datetime) -> dt.datetime:
    """Naive times are taken as UTC (everything hotvm writes is UTC)."""
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def ago(delta: dt.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 3600:
        return f"{seconds // 60} min"
    value, unit = (seconds / 3600, "h") if seconds < 2 * 86400 else (seconds / 86400, "d")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def may_be_running(point: BackupPoint, now: dt.datetime, grace: dt.timedelta) -> bool:
    return point.state is SetState.INCOMPLETE and aware(now) - aware(point.time) < grace


def with_overrides(keep: Keep, **overrides: int | None) -> Keep:
    """Command-line flags replace the configured policy as a whole (restic's behaviour): `--keep-last 3`
    means "keep 3", not "keep 3 and also everything the config's `days: 7` keeps"."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return keep
    try:
        return Keep(**given)
    except ValidationError:
        raise ConfigError(
            "the keep flags given would keep nothing", "give at least one --keep-* flag greater than 0"
        ) from None


def _gfs_reasons(
    complete: list[BackupPoint], policy: Keep, now: dt.datetime, tz: dt.tzinfo
) -> list[list[str]]:
    """`complete` newest first; returns the reasons of each, same order."""
    reasons: list[list[str]] = [[] for _ in complete]
    for i in range(min(policy.last, len(complete))):
        reasons[i].append(f"last {i + 1} of {policy.last}")
    if policy.days:
        cutoff = now - dt.timedelta(days=policy.days)
        for i, point in enumerate(complete):
            if aware(point.time) >= cutoff:
                reasons[i].append(f"within {policy.days} days")
    for rule, bucket_of in BUCKETS:
        wanted = getattr(policy, rule)
        last_bucket, used = None, 0
        for i, point in enumerate(complete):
            if used >= wanted:
                break
            bucket = bucket_of(aware(point.time).astimezone(tz))
            if bucket != last_bucket:
                last_bucket, used = bucket, used + 1
                reasons[i].append(f"{rule} {bucket}")
    return reasons


def decide(
    points: Iterable[BackupPoint],
    policy: Keep,
    now: dt.datetime,
    *,
    incomplete_grace: dt.timedelta = DEFAULT_INCOMPLETE_GRACE,
    tz: dt.tzinfo = dt.UTC,
) -> list[Decision]:
    """One decision per point, ordered by VM, then oldest first. Days, weeks, ... are counted in `tz`."""
    now = aware(now)
    by_vm: dict[str, list[BackupPoint]] = {}
    for point in points:
        by_vm.setdefault(point.vm, []).append(point)
    decisions: list[Decision] = []
    for vm in sorted(by_vm):
        points_of_vm = sorted(by_vm[vm], key=lambda p: (aware(p.time), p.backup_id))
        complete = [p for p in reversed(points_of_vm) if p.state is SetState.COMPLETE]
        gfs = _gfs_reasons(complete, policy, now, tz)
        reasons = {p.backup_id: why for p, why in zip(complete, gfs, strict=True)}
        if complete and not reasons[complete[0].backup_id]:
            reasons[complete[0].backup_id].append("newest complete backup of the VM (never removed)")
        for point in points_of_vm:
            why = reasons.get(point.backup_id, [])
            if point.state is SetState.COMPLETE:
                keep = bool(why)
                if not keep:
                    why.append(f"no rule keeps it ({policy.describe()})")
            elif point.state is SetState.DAMAGED:
                keep = True
                why.append("manifest unreadable: never removed by prune (see hotvm check)")
            else:
                age = now - aware(point.time)
                keep = age < incomplete_grace
                if keep:
                    why.append(
                        f"incomplete, written {ago(age)} ago: may still be running (kept "
                        f"{ago(incomplete_grace)}); not counted"
                    )
                else:
                    why.append(f"incomplete leftover: nothing written to it for {ago(age)}")
            if point.hold:
                if not keep:
                    why.clear()
                keep = True
                why.append(f"held: {point.hold}")
            decisions.append(Decision(point, keep, why))
    return decisions
