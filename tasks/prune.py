"""Prune steps as Prefect tasks (TaskSteps), each a thin task over hotvm.prune's RepositorySteps: the prune
flow hands TaskSteps to hotvm.prune.run_prune, the one prune path (tests run it with RepositorySteps)."""

from __future__ import annotations

import datetime as dt

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hotvm import prune, retention
from hotvm.config import Keep, TargetConfig
from hotvm.formats.opener import open_repository
from hotvm.prune import PruneSteps, SetOutcome, SweepReport
from hotvm.retention import BackupPoint, Decision
from targets.base import redact_url
from tasks._options import STEP


@task(name="list_sets", task_run_name="list_sets", **STEP)
def list_sets(target: str | None, vm: str | None, config: str | None = None) -> list[BackupPoint] | None:
    """Every backup set on the target (of one VM): complete, incomplete or unreadable, and when."""
    with open_repository(config, target) as repo:
        return prune.RepositorySteps(repo).list_sets(vm)


@task(name="decide_retention", task_run_name="decide_retention", retries=0, cache_policy=NO_CACHE)
def decide_retention(
    points: list[BackupPoint], policy: Keep, now: dt.datetime, incomplete_grace: dt.timedelta
) -> list[Decision]:
    """Pure: which sets the policy keeps, and why (GFS per VM; failed runs never count)."""
    return retention.decide(points, policy, now, incomplete_grace=incomplete_grace)


@task(name="remove_sets", task_run_name="remove_sets", **STEP)
def remove_sets(
    target: str | None, decisions: list[Decision], dry_run: bool, config: str | None = None
) -> list[SetOutcome]:
    """Delete the sets the policy does not keep (manifest first); nothing in a dry run."""
    with open_repository(config, target) as repo:
        outcomes = prune.RepositorySteps(repo).remove_sets(decisions, dry_run)
    log = get_run_logger()
    for o in outcomes:
        if not o.keep:
            verb = "would remove" if dry_run else "removed" if o.removed else "FAILED to remove"
            log.info(
                "%s %s/%s: %s%s",
                verb,
                o.vm,
                o.backup_id,
                "; ".join(o.reasons),
                f" ({o.error})" if o.error else "",
            )
    return outcomes


@task(name="sweep_chunks", task_run_name="sweep_chunks", **STEP)
def sweep_chunks(
    target: str | None,
    removed: list[str],
    dry_run: bool,
    now: dt.datetime,
    set_grace: dt.timedelta,
    chunk_grace: dt.timedelta,
    config: str | None = None,
) -> SweepReport:
    """Mark the chunks every remaining set references, then remove the others (not while a backup runs)."""
    with open_repository(config, target) as repo:
        report = prune.RepositorySteps(repo).sweep(removed, dry_run, now, set_grace, chunk_grace)
    log = get_run_logger()
    for reason in report.skipped_because:
        log.warning("chunk sweep skipped: %s", reason)
    for note in report.notes:
        log.info("%s", note)
    return report


class TaskSteps(PruneSteps):
    """hotvm.prune's steps, each run as the task above (its own run, retries and log in Prefect)."""

    def __init__(self, target: TargetConfig, config: str | None) -> None:
        self.target, self.url, self.config = target.name, redact_url(target.url), config

    def list_sets(self, vm: str | None) -> list[BackupPoint] | None:
        return list_sets(self.target, vm, self.config)

    def decide(self, points: list[BackupPoint], policy: Keep, now: dt.datetime,
               set_grace: dt.timedelta) -> list[Decision]:
        return decide_retention(points, policy, now, set_grace)

    def remove_sets(self, decisions: list[Decision], dry_run: bool) -> list[SetOutcome]:
        return remove_sets(self.target, decisions, dry_run, self.config)

    def sweep(self, removed: list[str], dry_run: bool, now: dt.datetime, set_grace: dt.timedelta,
              chunk_grace: dt.timedelta) -> SweepReport:
        return sweep_chunks(self.target, removed, dry_run, now, set_grace, chunk_grace, self.config)
