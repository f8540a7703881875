"""The per-VM runner and report shared by backup_host and backup_policy ("backup all").

Each VM is a backup_vm subflow run from a task on the parent's ThreadPoolTaskRunner; how many run at once
on a host is capped by the host's global concurrency limit taken inside backup_vm, so the cap also holds
across concurrently running deployments. Every VM ends as one report row:
    success  a complete backup set (its id)
    skipped  nothing backed up, and why (no disks to back up, claimed by an earlier policy)
    failed   the step that failed (reconcile, plan, export[vda], ...) and the error
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows._limits import ensure_host_limit
from flows.backup_vm import backup_vm
from hotvm.errors import RunFailed
from hotvm.models import load_config

MAX_PARALLEL_VMS = 16
"""Threads waiting for (or holding) a host slot; the per-host limits decide what actually runs."""


class BackupsFailed(RunFailed):
    """Some VMs of a "backup all" run failed; `results` is the whole per-VM report."""


def _failed_task(flow_run_id: object) -> str | None:
    """The failed step as the subflow's task runs show it (when the exception does not say)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
    except Exception:  # noqa: BLE001 - the report still names the error
        return None
    failed = [r for r in runs if r.state is not None and (r.state.is_failed() or r.state.is_crashed())]
    failed.sort(key=lambda r: r.start_time or r.expected_start_time or r.created)
    return failed[-1].name if failed else None


@task(name="backup_one_vm", task_run_name="backup[{vm}]", cache_policy=NO_CACHE)
def backup_one_vm(vm: str, target: str | None, config: str | None, host: str = "") -> dict:
    """Runs backup_vm as a subflow, so each VM's steps show (and can be retried) in the UI on their own."""
    row = {"host": host, "vm": vm}
    state = backup_vm(vm=vm, target=target, config=config, return_state=True)
    if state.is_completed():
        result = state.result()
        if result.get("skipped"):
            return {**row, "ok": True, "status": "skipped", "reason": result["skipped"], **result}
        return {**row, "ok": True, "status": "success", **result}
    exc = state.result(raise_on_failure=False)
    step = getattr(exc, "hotvm_step", None) or _failed_task(state.state_details.flow_run_id)
    return {
        **row,
        "ok": False,
        "status": "failed",
        "step": step or "before the first step",
        "error": (str(exc) or type(exc).__name__)
        if isinstance(exc, BaseException)
        else (state.message or str(state.type.value)),
    }


def run_vms(
    pairs: list[tuple[str, str]], target: str | None, config: str | None, skipped: list[dict] = ()
) -> list[dict]:
    """Back up (host, vm) pairs concurrently (submitted on the calling flow's task runner); report rows in
    the order given, then `skipped` rows (host, vm, reason) for VMs deliberately left out."""
    cfg = load_config(config)
    for host in dict.fromkeys(h for h, _ in pairs):  # once here, before the VMs race to create it
        ensure_host_limit(host, cfg.find_host(host).max_concurrent_backups)
    futures = [backup_one_vm.submit(vm, target, config, host) for host, vm in pairs]
    results = [f.result() for f in futures]
    results += [{**s, "ok": True, "status": "skipped", "backup_id": None} for s in skipped]
    return results


def report_rows(results: list[dict]) -> list[dict]:
    """One flat row per VM: for the table artifact, the CLI table and --json."""
    rows = []
    for r in results:
        if r["status"] == "success":
            detail = r.get("url") or ""
        elif r["status"] == "skipped":
            detail = r.get("reason") or ""
        else:
            detail = r.get("error") or ""
        seconds = sum(s["seconds"] for s in r.get("steps") or [])
        rows.append(
            {
                "host": r.get("host", ""),
                "vm": r["vm"],
                "status": r["status"],
                "backup_id": r.get("backup_id"),
                "step": r.get("step"),
                "detail": detail,
                "seconds": round(seconds, 3),
            }
        )
    return rows


def publish(results: list[dict], key: str, description: str, what: str) -> list[dict]:
    """Table artifact + log lines; raises BackupsFailed (carrying the report) if any VM failed."""
    rows = report_rows(results)
    create_table_artifact(rows, key=key, description=description)
    log = get_run_logger()
    for r in rows:
        if r["status"] == "failed":
            log.error("backup of %s failed at %s: %s", r["vm"], r["step"], r["detail"])
        elif r["status"] == "skipped":
            log.warning("backup of %s skipped: %s", r["vm"], r["detail"])
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise BackupsFailed(
            f"{len(failed)} of {len(rows)} VM backups of {what} failed: "
            + ", ".join(f"{r['vm']} (at {r['step']})" for r in failed),
            "see each VM's flow run; rerun it to resume",
            results,
        )
    return results


def artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
