"""Retention decisions over synthetic backup histories: plain data in, decisions out (no target, no clock)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from hotvm.config import Keep, TargetConfig
from hotvm.config_file import parse_config
from hotvm.errors import ConfigError
from hotvm.retention import BackupPoint, Decision, SetState, decide, with_overrides

UTC = dt.UTC
NOW = dt.datetime(2025, 1, 10, 12, 0, tzinfo=UTC)


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def point(
    when: str | dt.datetime, vm: str = "web01", state: SetState = SetState.COMPLETE, **kw
) -> BackupPoint:
    t = at(when) if isinstance(when, str) else when
    return BackupPoint(vm, f"{t:%Y%m%dT%H%M%SZ}-{vm[:4]}", state, t, **kw)


def kept(decisions: list[Decision]) -> list[str]:
    return [f"{d.point.time:%Y-%m-%d %H:%M}" for d in decisions if d.keep]


def reasons(decisions: list[Decision], when: str) -> list[str]:
    (d,) = [d for d in decisions if d.point.time == at(when)]
    return d.reasons


def test_daily_keeps_the_newest_of_each_of_the_newest_days() -> None:
    points = [point(f"2025-01-{day:02d}T{hour:02d}:00") for day in (6, 7, 9) for hour in (1, 13, 23)]
    decisions = decide(points, Keep(daily=2), NOW)
    assert kept(decisions) == ["2025-01-07 23:00", "2025-01-09 23:00"]  # day 8 has none: not counted
    assert reasons(decisions, "2025-01-09T23:00") == ["daily 2025-01-09"]
    assert reasons(decisions, "2025-01-06T23:00") == ["no rule keeps it (daily 2)"]
    assert len(decisions) == len(points)  # one decision per set, oldest first
    assert [d.point.time for d in decisions] == sorted(p.time for p in points)


def test_day_boundary_is_midnight_in_the_given_timezone() -> None:
    late, early = point("2025-01-09T23:59:59"), point("2025-01-10T00:00:00")
    assert kept(decide([late, early], Keep(daily=2), NOW)) == ["2025-01-09 23:59", "2025-01-10 00:00"]
    # In New York (UTC-5) both are on 2025-01-09: one day, so even daily 2 keeps only the newer one.
    ny = decide([late, early], Keep(daily=2), NOW, tz=ZoneInfo("America/New_York"))
    assert kept(ny) == ["2025-01-10 00:00"]
    assert reasons(ny, "2025-01-10T00:00") == ["daily 2025-01-09"]


def test_iso_weeks_across_new_year() -> None:
    # 2024-12-29 is a Sunday (2024-W52); Monday 2024-12-30 already belongs to 2025-W01.
    points = [point(t) for t in ("2024-12-28T10:00", "2024-12-29T10:00", "2024-12-30T10:00",
                                 "2025-01-05T10:00", "2025-01-06T10:00")]
    decisions = decide(points, Keep(weekly=3), NOW)
    assert kept(decisions) == ["2024-12-29 10:00", "2025-01-05 10:00", "2025-01-06 10:00"]
    assert reasons(decisions, "2025-01-05T10:00") == ["weekly 2025-W01"]
    assert reasons(decisions, "2024-12-29T10:00") == ["weekly 2024-W52"]


def test_monthly_and_yearly_at_their_edges() -> None:
    points = [point(t) for t in ("2023-11-30T12:00", "2023-12-31T23:59:59", "2024-01-01T00:00",
                                 "2024-01-31T23:59", "2024-02-01T00:00:01")]
    now = at("2024-02-02T00:00")
    assert kept(decide(points, Keep(monthly=3), now)) == [
        "2023-12-31 23:59", "2024-01-31 23:59", "2024-02-01 00:00"
    ]
    yearly = decide(points, Keep(yearly=5), now)
    assert kept(yearly) == ["2023-12-31 23:59", "2024-02-01 00:00"]
    assert reasons(yearly, "2023-12-31T23:59:59") == ["yearly 2023"]
    assert reasons(yearly, "2024-02-01T00:00:01") == ["yearly 2024"]  # the newest of its year


def test_february_of_a_leap_year_and_rules_counting_independently() -> None:
    points = [point(t) for t in ("2024-02-28T12:00", "2024-02-29T12:00", "2024-03-01T12:00")]
    decisions = decide(points, Keep(last=1, daily=2, monthly=2), at("2024-03-01T13:00"))
    assert kept(decisions) == ["2024-02-29 12:00", "2024-03-01 12:00"]
    assert reasons(decisions, "2024-03-01T12:00") == ["last 1 of 1", "daily 2024-03-01", "monthly 2024-03"]
    assert reasons(decisions, "2024-02-29T12:00") == ["daily 2024-02-29", "monthly 2024-02"]


def test_keep_days_is_measured_from_now_boundary_included() -> None:
    points = [point(NOW - dt.timedelta(days=7)), point(NOW - dt.timedelta(days=7, seconds=1)), point(NOW)]
    decisions = decide(points, Keep(days=7), NOW)
    assert [d.keep for d in decisions] == [False, True, True]
    assert decisions[1].reasons == ["within 7 days"]


def test_table_7_3_default_keeps_one_week_of_weekly_images() -> None:
    assert TargetConfig(name="nas", url="/srv/b").keep == Keep(last=1, days=7)
    saturdays = [point(NOW - dt.timedelta(days=d)) for d in (20, 13, 6)]
    assert [d.keep for d in decide(saturdays, Keep(last=1, days=7), NOW)] == [False, False, True]


def test_incomplete_and_failed_sets_never_count() -> None:
    good = point("2025-01-08T02:00")
    failed = point("2025-01-09T02:00", state=SetState.INCOMPLETE)  # a run killed two days ago
    running = point(NOW - dt.timedelta(minutes=20), state=SetState.INCOMPLETE)
    decisions = decide([good, failed, running], Keep(last=1), NOW)
    by_time = {d.point.time: d for d in decisions}
    assert by_time[good.time].keep and by_time[good.time].reasons == ["last 1 of 1"]
    assert not by_time[failed.time].keep
    assert "incomplete leftover" in by_time[failed.time].reasons[0]
    assert by_time[running.time].keep
    assert "may still be running" in by_time[running.time].reasons[0]


def test_a_failed_run_does_not_rotate_a_good_backup_out() -> None:
    older, newer = point("2025-01-01T02:00"), point("2025-01-08T02:00")
    failures = [point(f"2025-01-09T0{h}:00", state=SetState.INCOMPLETE) for h in range(1, 4)]
    decisions = decide([older, newer, *failures], Keep(last=2), NOW)
    assert kept(decisions) == ["2025-01-01 02:00", "2025-01-08 02:00"]


def test_incomplete_grace_boundary() -> None:
    young = point(NOW - dt.timedelta(hours=23, minutes=59), state=SetState.INCOMPLETE)
    old = point(NOW - dt.timedelta(hours=24), state=SetState.INCOMPLETE)
    assert [d.keep for d in decide([young, old], Keep(last=1), NOW)] == [False, True]
    short = decide([young, old], Keep(last=1), NOW, incomplete_grace=dt.timedelta(hours=1))
    assert [d.keep for d in short] == [False, False]


def test_only_complete_backup_is_never_removed() -> None:
    lonely = point("2024-06-01T02:00", vm="db01")
    leftover = point("2024-06-02T02:00", vm="db01", state=SetState.INCOMPLETE)
    decisions = decide([lonely, leftover], Keep(days=7), NOW)
    assert [d.keep for d in decisions] == [True, False]
    assert decisions[0].reasons == ["newest complete backup of the VM (never removed)"]
    # several old sets: only the newest of them stays
    olds = [point(f"2024-06-0{d}T02:00", vm="db01") for d in (1, 2, 3)]
    assert kept(decide(olds, Keep(days=7), NOW)) == ["2024-06-03 02:00"]


def test_vms_are_decided_independently() -> None:
    web = [point(f"2025-01-0{d}T02:00", vm="web01") for d in (7, 8, 9)]
    db = [point(f"2025-01-0{d}T03:00", vm="db01") for d in (1, 2)]
    decisions = decide(web + db, Keep(last=1), NOW)
    assert [(d.point.vm, d.keep) for d in decisions] == [
        ("db01", False), ("db01", True), ("web01", False), ("web01", False), ("web01", True)
    ]


def test_unreadable_manifests_and_holds_are_kept_and_not_counted() -> None:
    good = point("2025-01-08T02:00")
    damaged = point("2025-01-09T02:00", state=SetState.DAMAGED)
    held = point("2025-01-01T02:00", hold="tape copy vtl-0003 reads it")
    decisions = decide([held, good, damaged], Keep(last=1), NOW)
    assert [d.keep for d in decisions] == [True, True, True]
    assert decisions[0].reasons == ["held: tape copy vtl-0003 reads it"]
    assert decisions[1].reasons == ["last 1 of 1"]  # the damaged newer set did not take its place
    assert "manifest unreadable" in decisions[2].reasons[0]


def test_policy_model_and_overrides() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Keep()
    with pytest.raises(ValueError):
        Keep(daily=-1)
    configured = Keep(last=1, days=7)
    assert with_overrides(configured) == configured
    assert with_overrides(configured, last=None, daily=7) == Keep(daily=7)  # flags replace the policy
    with pytest.raises(ConfigError, match="keep nothing"):
        with_overrides(configured, last=0)
    cfg = parse_config(
        {
            "hosts": [{"name": "h"}],
            "targets": [{"name": "nas", "url": "/srv", "keep": {"daily": 7, "weekly": 4, "monthly": 12}}],
        }
    )
    assert cfg.targets[0].keep == Keep(daily=7, weekly=4, monthly=12)
    with pytest.raises(ConfigError, match=r"targets\.0\.keep\.hourly: unknown key"):
        parse_config(
            {"hosts": [{"name": "h"}], "targets": [{"name": "n", "url": "/s", "keep": {"hourly": 1}}]}
        )
