"""After a per-VM run completes (typically a Retry of a failed one): its stale `step:` tag goes, and a failed
parent tells the truth again (docs/scale-out.md "Reruns from the UI").

The parent (weekly-image, daily-files, verify, ... or a run that handed its work off, flows/_handoff.py)
ended Failed while this VM's run was failed. Now that it completed: the parent's graph node of this run
turns green, the parent's report table gets a new version with every child's current state, and when no
VM of the report is failed any more the parent is set Completed with a message naming this run. Retrying
the parent still re-runs only VMs whose last run did not complete (flows/_fleet._start_child).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

STEP_TAG = "step:"


def completed_hook(flow: Any, run: Any, state: Any) -> None:  # noqa: ANN401, ARG001 - Prefect hook signature
    """on_completion of every per-VM flow; never changes this run's own outcome."""
    if not getattr(run, "deployment_id", None):
        return  # the CLI's in-process subflows: the parent in this process reports them
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run.id)
            stale = [t for t in current.tags if t.startswith(STEP_TAG)]
            if stale:
                client.update_flow_run(run.id, tags=[t for t in current.tags if t not in stale])
            if current.parent_task_run_id is not None and current.run_count > 1:  # a retried run
                _tell_parent(client, current)
    except Exception as exc:  # noqa: BLE001 - the run completed; this only corrects what others show
        get_run_logger().warning("could not update the parent run of this retried run: %s", exc)


def _tell_parent(client: Any, child: Any) -> None:  # noqa: ANN401
    from prefect.states import Completed

    node = client.read_task_run(child.parent_task_run_id)
    parent = client.read_flow_run(node.flow_run_id)
    if parent.state is None or not parent.state.is_failed():
        return  # still running (it reports its children itself), or not failed
    with contextlib.suppress(Exception):  # cosmetic: the graph node of this run
        client.set_task_run_state(node.id, Completed(), force=True)
    vm = (child.parameters or {}).get("vm")
    if parent.deployment_id == child.deployment_id:  # a run that handed its work to this one
        still_failed = False
    else:
        still_failed = _refresh_reports(client, parent, vm, child.name)
        if still_failed is None:
            return  # no report names this VM: nothing to correct
    if not still_failed:
        message = f"every VM completed: {vm} after a retry of its run '{child.name}'"
        _log_on(client, parent.id, f"{message}: this run is Completed now (its errors above are history)")
        client.set_flow_run_state(parent.id, Completed(message=message), force=True)
    else:
        _log_on(client, parent.id, f"{vm} completed on a retry of its run '{child.name}' (report updated); "
                "other VMs are still failed")  # fmt: skip


def _log_on(client: Any, run_id: Any, message: str) -> None:  # noqa: ANN401
    """A line at the end of the parent's log: its earlier ERROR lines are what happened before the retry."""
    import datetime as dt
    import logging

    from prefect.client.schemas.actions import LogCreate

    with contextlib.suppress(Exception):
        client.create_logs([LogCreate(name="hotvm.retried", level=logging.INFO, message=message,
                                      timestamp=dt.datetime.now(dt.UTC), flow_run_id=run_id)])  # fmt: skip


def _refresh_reports(client: Any, parent: Any, vm: str, child_name: str) -> bool | None:  # noqa: ANN401
    """A new version of each report table of `parent` that has a row for `vm`, every row of a child run
    re-read from that run. Returns whether a row is still failed (None: no report has the VM)."""
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    from flows._fleet import _child_row, report_rows

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id]), type=ArtifactFilterType(any_=["table"])
        ),
        sort=ArtifactSort.CREATED_DESC,
    )
    latest = {}
    for a in artifacts:
        latest.setdefault(a.key, a)
    children = {}
    for run in client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    ):  # oldest first: a VM's latest run wins
        children[(run.parameters or {}).get("vm")] = run
    found, still_failed = False, False
    for key, artifact in latest.items():
        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        if not isinstance(rows, list) or not any(isinstance(r, dict) and r.get("vm") == vm for r in rows):
            continue
        found = True
        fresh = []
        for r in rows:
            run = children.get(r.get("vm"))
            if run is not None and run.state is not None and run.state.is_final():
                r = report_rows([_child_row(r.get("host", ""), r["vm"], run)])[0]
            fresh.append(r)
        still_failed |= any(r.get("status") == "failed" for r in fresh)
        description = (artifact.description or "").split(" (updated:")[0]
        client.create_artifact(
            ArtifactCreate(
                key=key, type="table", data=json.dumps(fresh), flow_run_id=parent.id,
                description=f"{description} (updated: {vm} completed on a retry of '{child_name}')",
            )
        )  # fmt: skip
    return still_failed if found else None
