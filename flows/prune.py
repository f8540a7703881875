"""prune: retention for one target (seed Table 7.3: images kept one week), then free unreferenced chunks.

    list_sets -> decide_retention (per VM, pure) -> remove_sets (manifest first) -> sweep_chunks

These steps are tasks (tasks/prune.py TaskSteps) run by hotvm.prune.run_prune, the one prune path. The
policy is the target's `keep:` in hotvm.yaml, else each VM's policy `image.keep` (hotvm/policies.py);
any keep_* parameter replaces it as a whole. File sets are kept by each VM's `files.keep`.
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._runs import artifact_key, fleet_run_name
from hotvm.prune import PruneReport, prune_policy, run_prune
from tasks.prune import TaskSteps


@flow(name="prune", flow_run_name=fleet_run_name("prune", "target"))
def prune(
    target: str | None = None,
    vm: str | None = None,
    dry_run: bool = False,
    config: str | None = None,
    keep_last: int | None = None,
    keep_days: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    keep_monthly: int | None = None,
    keep_yearly: int | None = None,
    incomplete_grace_hours: float = 24.0,
    chunk_grace_minutes: float = 60.0,
) -> dict:
    """Remove the backup sets the retention policy does not keep, then the chunks nothing references.

    Args:
        target: The target's name in hotvm.yaml; empty: the default target.
        vm: Only this VM's sets; empty: every VM on the target.
        dry_run: Only report what would be removed.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        keep_last: Override the retention: keep the newest N sets per VM.
        keep_days: Override the retention: keep every set of the last N days.
        keep_daily: Override the retention: keep one set per day for N days.
        keep_weekly: Override the retention: keep one set per week for N weeks.
        keep_monthly: Override the retention: keep one set per month for N months.
        keep_yearly: Override the retention: keep one set per year for N years.
        incomplete_grace_hours: An unfinished set younger than this may still be resumed: it stays.
        chunk_grace_minutes: A chunk newer than this may belong to a running backup: it stays.
    """
    log = get_run_logger()
    overrides = dict(
        last=keep_last,
        days=keep_days,
        daily=keep_daily,
        weekly=keep_weekly,
        monthly=keep_monthly,
        yearly=keep_yearly,
    )
    target_cfg, policy = prune_policy(config, target, **overrides)
    report = run_prune(
        TaskSteps(target_cfg, config),
        policy,
        vm=vm,
        dry_run=dry_run,
        set_grace=dt.timedelta(hours=incomplete_grace_hours),
        chunk_grace=dt.timedelta(minutes=chunk_grace_minutes),
    )
    create_table_artifact(
        artifact_rows(report), key=f"prune-{artifact_key(target_cfg.name)}", description=describe(report)
    )
    log.info("%s", describe(report))
    return report.summary()


def artifact_rows(report: PruneReport) -> list[dict]:
    def decision(s) -> str:  # noqa: ANN001 - SetOutcome
        if s.error:
            return f"removal failed: {s.error}"
        if s.keep:
            return "kept"
        return "would remove" if report.dry_run else "removed"

    return [
        {
            "vm": s.vm,
            "backup": s.backup_id,
            "state": str(s.state),
            "time": f"{s.time:%Y-%m-%d %H:%M}",
            "decision": decision(s),
            "reasons": "; ".join(s.reasons),
        }
        for s in report.sets
    ]


def describe(report: PruneReport) -> str:
    sweep = report.sweep
    verb = "would remove" if report.dry_run else "removed"
    text = (
        f"prune of '{report.target}' ({report.policy.describe()}){' [dry run]' if report.dry_run else ''}: "
        f"{len(report.kept)} set(s) kept, {len(report.removed)} {verb}; "
    )
    if sweep.swept:
        freed = "to free" if report.dry_run else "freed"
        text += f"{sweep.chunks_removed} chunk(s) {verb}, {report.bytes_freed / 2**20:.1f} MiB {freed}"
    else:
        text += "chunk sweep skipped: " + "; ".join(sweep.skipped_because)
    if report.errors:
        text += f"; {len(report.errors)} error(s)"
    return text
