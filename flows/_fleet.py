"""The per-VM fan-out and report shared by weekly-image (backup_policy), backup-host and daily-files, and
(`fan_out`) by verify, recover and sync-config (per-VM deployments verify-vm, recover-vm, sync-vm).

Run from a deployment (the Prefect UI's scheduled runs), each VM is its own run of the per-VM deployment
(`backup-vm`, `files-vm`) started with `run_deployment` on the work queue named after the VM's host, so
the host's worker runs it, it is linked to the parent as a subflow, and it can be retried on its own
(UI Retry, `prefect flow-run retry`). A retried parent finds its earlier child runs (same idempotency
key): completed ones are reported again, failed ones are rescheduled (they resume), nothing is run twice.

Run from the CLI (no deployment: the embedded server, no workers), each VM is a subflow in this process,
submitted on the parent's ThreadPoolTaskRunner. Either way the host's concurrency limit, taken inside the
per-VM flow, caps how many run at once on a host. Every VM ends as one report row:
    success  a complete backup set (its id)
    skipped  nothing backed up, and why (no disks to back up, claimed by an earlier policy)
    failed   the step that failed (reconcile, plan, export vda, ...) and the error
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from flows._limits import ensure_host_limit
from flows._runs import vm_tags
from hotvm.config_file import load_config
from hotvm.errors import RunFailed
from hotvm.hypervisors.resolve import HostFailure

MAX_PARALLEL_VMS = 16
"""Threads waiting for (or holding) a host slot in the CLI's in-process fan-out."""
POLL_S = 1.0
"""How often the parent reads its children's states (one API call for all of them)."""

PER_VM = {
    "image": ("backup-vm/backup-vm", "backup"),
    "files": ("files-vm/files-vm", "files"),
    "verify": ("verify-vm/verify-vm", "verify"),
    "recover": ("recover-vm/recover-vm", "recover"),
    "standby": ("sync-vm/sync-vm", "sync"),
    "restore": ("restore-vm/restore-vm", "restore"),
    "instant": ("instant-restore/instant-restore", "instant-restore"),
}
"""kind -> (per-VM deployment, verb of its run names)."""


class BackupsFailed(RunFailed):
    """Some VMs of a "backup all" run failed; `results` is the whole per-VM report."""


def _failed_task(flow_run_id: object) -> str | None:
    """The failed step as the child run's task runs show it (when the exception does not say)."""
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


def _state_row(row: dict, state: Any) -> dict:
    """A report row from an in-process subflow's final state."""
    if state.is_completed():
        result = state.result()
        if (state.message or "").startswith("skipped: ") or result.get("skipped"):
            return {**row, "ok": True, "status": "skipped", "reason": result.get("skipped"), **result}
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


@task(name="backup_one_vm", task_run_name="backup {vm}", cache_policy=NO_CACHE)
def backup_one_vm(vm: str, target: str | None, config: str | None, host: str = "") -> dict:
    """backup_vm as a subflow of this process (the CLI's fan-out)."""
    from flows.backup_vm import backup_vm

    return _state_row(
        {"host": host, "vm": vm}, backup_vm(vm=vm, target=target, config=config, return_state=True)
    )


@task(name="files_one_vm", task_run_name="files {vm}", cache_policy=NO_CACHE)
def files_one_vm(vm: str, target: str | None, config: str | None, host: str = "") -> dict:
    """files_vm as a subflow of this process (the CLI's fan-out)."""
    from flows.daily_files import files_vm

    return _state_row(
        {"host": host, "vm": vm}, files_vm(vm=vm, target=target, config=config, return_state=True)
    )


IN_PROCESS = {"image": backup_one_vm, "files": files_one_vm}


def run_vms(
    pairs: list[tuple[str, str]],
    target: str | None,
    config: str | None,
    skipped: list[dict] = (),
    kind: str = "image",
    policy: str | None = None,
) -> list[dict]:
    """Back up (host, vm) pairs concurrently; report rows in the order given, then `skipped` rows (host,
    vm, reason) for VMs deliberately left out."""
    cfg = load_config(config)
    for host in dict.fromkeys(h for h, _ in pairs):  # once here, before the VMs race to create it
        ensure_host_limit(host, cfg.find_host(host).max_concurrent_backups)
    if deployment.id:
        limits = {h: cfg.find_host(h).max_concurrent_backups for h in dict.fromkeys(h for h, _ in pairs)}
        params = {"target": target, "config": config}
        results = run_vm_deployments(pairs, kind, params, limits, policy=policy)
    else:
        futures = [IN_PROCESS[kind].submit(vm, target, config, host) for host, vm in pairs]
        results = [f.result() for f in futures]
    results += [{**s, "ok": True, "status": "skipped", "backup_id": None} for s in skipped]
    return results


def fan_out(
    vms: list[str],
    kind: str,
    parameters: dict,
    config: str | None,
    in_order: bool = False,
    hosts: dict[str, str] | None = None,
) -> list[dict]:
    """One per-VM run of `kind` per VM on the queue of `hosts[vm]` (default: the VM's host; a VM no host
    of hotvm.yaml lists, e.g. one only on the target, goes to the fleet queue), at most that host's
    max_concurrent_backups at once: for verify, recover and sync-config, whose per-VM work is heavier
    than a backup's wait for a slot."""
    from flows._runs import FLEET_QUEUE, host_of

    cfg = load_config(config)
    hosts = hosts or {}
    pairs = [(hosts.get(vm) or host_of(vm, cfg) or FLEET_QUEUE, vm) for vm in vms]
    limits = {}
    for host, _ in pairs:
        known = [h for h in cfg.hosts if h.name == host]
        limits[host] = known[0].max_concurrent_backups if known else 2
    return run_vm_deployments(pairs, kind, parameters, limits, in_flight=lambda n: n, in_order=in_order)


def unlisted_rows(failures: list[HostFailure]) -> list[dict]:
    """One failed row per host whose VMs could not be listed (resolve_vms): its VMs fail, no one else's."""
    return [
        {"host": f.host, "vm": f"(VMs of {f.host})", "ok": False, "status": "failed", "step": "list VMs",
         "error": str(f)}
        for f in failures
    ]  # fmt: skip


def in_flight_per_host(limit: int) -> int:
    """How many child runs of one host may exist unfinished at once: `limit` backing up plus two per slot
    started and waiting, so a freed slot is taken at once even when a new child's start (worker poll,
    process start-up: 4 s idle, 15-26 s on a loaded host) outlasts one backup (bench/many_vms.py: 16 x
    512 MiB, 1.86x the ideal vs 2.45x with one waiting), while a host with 50 VMs does not get 50
    processes. HOTVM_CHILDREN_PER_SLOT overrides the factor 3 (0: start every child at once)."""
    factor = int(os.environ.get("HOTVM_CHILDREN_PER_SLOT", "3"))
    return limit * factor if factor > 0 else 1 << 30


def run_vm_deployments(
    pairs: list[tuple[str, str]],
    kind: str,
    parameters: dict,
    limits: dict[str, int],
    *,
    policy: str | None = None,
    in_flight: Callable[[int], int] = in_flight_per_host,
    in_order: bool = False,
) -> list[dict]:
    """One run of the per-VM deployment of `kind` per (host, vm), on the host's queue, with `parameters`
    plus `vm`; at most `in_flight(limits[host])` of a host unfinished at once; waits for all of them. Rows
    in the order of `pairs`. in_order: no VM starts before every VM listed before it has (recovery order)."""
    from prefect.client.orchestration import get_client

    todo = list(pairs)
    running: dict = {}  # child id -> (host, vm)
    finals: dict = {}  # vm -> final child run
    with get_client(sync_client=True) as client:
        while todo or running:
            busy = Counter(host for host, _ in running.values())
            for host, vm in list(todo):
                if busy[host] >= in_flight(limits[host]):
                    if in_order:
                        break
                    continue
                todo.remove((host, vm))
                child = _start_child(client, kind, host, vm, {**parameters, "vm": vm}, policy)
                if child.state is not None and child.state.is_completed():
                    finals[vm] = child
                else:
                    running[child.id] = (host, vm)
                    busy[host] += 1
            for run in _finished(client, list(running)):
                finals[running.pop(run.id)[1]] = run
                _mirror_on_parent_graph(client, run)
            if running:
                time.sleep(POLL_S)
        return [_child_row(host, vm, finals[vm]) for host, vm in pairs]


def _start_child(client: Any, kind: str, host: str, vm: str, parameters: dict, policy: str | None) -> Any:
    """The VM's run of the per-VM deployment on its host's queue (a retried parent gets its earlier run
    back: completed, it is reported again; otherwise it is rescheduled and resumes)."""
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    name, verb = PER_VM[kind]
    child = run_deployment(
        name,
        parameters=parameters,
        flow_run_name=f"{verb} {vm}@{host} {flow_run.scheduled_start_time:%Y-%m-%d}",
        tags=vm_tags(kind, vm, host, policy),
        idempotency_key=f"{flow_run.get_id()}:{kind}:{vm}",
        work_queue_name=host,
        as_subflow=True,
        timeout=0,
    )
    state = child.state
    if state is not None and state.is_completed():
        get_run_logger().info("%s: %s completed in an earlier attempt of this run", vm, child.name)
    elif state is not None and state.is_final():
        get_run_logger().info("%s: %s did not complete: retrying it (it resumes)", vm, child.name)
        client.set_flow_run_state(child.id, Scheduled(message="retried by its parent"), force=True)
    return child


def _finished(client: Any, ids: list) -> list:
    """The child runs among `ids` that are final now (one API read per 200)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = []
    for start in range(0, len(ids), 200):  # the API's page size
        page = ids[start : start + 200]
        runs += client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
        )
    return [r for r in runs if r.state is not None and r.state.is_final()]


def _mirror_on_parent_graph(client: Any, child: Any) -> None:
    """The parent's graph node for a child run is a task run run_deployment left Pending: give it the
    child's outcome, so a failed VM shows red in the parent's graph."""
    from prefect.states import Completed, Failed

    if child.parent_task_run_id is None:
        return
    state = Completed() if child.state.is_completed() else Failed(message=child.state.message)
    try:
        client.set_task_run_state(child.parent_task_run_id, state, force=True)
    except Exception as exc:  # noqa: BLE001 - cosmetic: the report and the parent's state still say it
        get_run_logger().debug("could not mark the graph node of %s: %s", child.name, exc)


def _child_row(host: str, vm: str, child: Any) -> dict:
    """A report row from a child run as the API returns it (its result may be on another machine)."""
    from prefect.utilities.urls import url_for

    state = child.state
    row = {"host": host, "vm": vm, "run": child.name, "link": url_for(child) or "", "backup_id": None}
    message = state.message or ""
    if state.is_completed():
        if message.startswith("skipped: "):
            return {**row, "ok": True, "status": "skipped", "reason": message.removeprefix("skipped: ")}
        return {**row, "ok": True, "status": "success", "backup_id": set_of(message), "url": message}
    error = message.removeprefix("Flow run encountered an exception: ") or state.type.value.lower()
    step = _failed_task(child.id) or "before the first step"
    return {**row, "ok": False, "status": "failed", "step": step, "error": error}


SET_IN_MESSAGE = re.compile(
    r"^(?:file )?backup (?P<backup>\S+) complete"  # flows/backup_vm.py, flows/daily_files.py
    r"|^verified (?P<verified>[^\s,]+)"  # verify-vm
    r"|^recovered (?P<recovered>\S+) in "  # recover-vm
    r"|from backup (?P<synced>\S+)"  # sync-vm
)
"""The backup set a completed per-VM run names in its state message (its result may be on another
machine: the message is what the parent can read)."""


def set_of(message: str) -> str | None:
    """The backup set a completed child's state message names, for the report's backup_id column."""
    match = SET_IN_MESSAGE.search(message)
    return next((v for v in match.groupdict().values() if v), None) if match else None


def report_rows(results: list[dict]) -> list[dict]:
    """One flat row per VM: for the table artifact, the CLI table and --json. `run` links a child run
    (deployment fan-out) in the UI."""
    rows = []
    for r in results:
        if r["status"] == "success":
            detail = r.get("url") or ""
        elif r["status"] == "skipped":
            detail = r.get("reason") or ""
        else:
            detail = r.get("error") or ""
        seconds = sum(s["seconds"] for s in r.get("steps") or [])
        row = {
            "host": r.get("host", ""),
            "vm": r["vm"],
            "status": r["status"],
            "backup_id": r.get("backup_id"),
            "step": r.get("step"),
            "detail": detail,
            "seconds": round(seconds, 3),
        }
        row["run"] = r.get("link") or ""
        rows.append(row)
    return rows


def publish(
    results: list[dict], key: str, description: str, what: str, job: str = "backup", jobs: str = "VM backups"
) -> list[dict]:
    """Table artifact + log lines; raises BackupsFailed (carrying the report) if any VM failed. `job`
    names one VM's run in the log (backup, restore test, ...), `jobs` their plural in the error."""
    rows = report_rows(results)
    create_table_artifact(rows, key=key, description=description)
    log = get_run_logger()
    for r in rows:
        if r["status"] == "failed":
            log.error("%s of %s failed at %s: %s %s", job, r["vm"], r["step"], r["detail"], r["run"])
        elif r["status"] == "skipped":
            log.warning("%s of %s skipped: %s", job, r["vm"], r["detail"])
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise BackupsFailed(
            f"{len(failed)} of {len(rows)} {jobs} of {what} failed: "
            + ", ".join(f"{r['vm']} (at {r['step']})" for r in failed),
            "see each VM's flow run; rerun it to resume",
            results,
        )
    return results
