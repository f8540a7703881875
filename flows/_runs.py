"""What makes a run readable and correctly routed in the Prefect UI: names, tags, the host-queue check.

Routing convention (docs/scale-out.md): work pool `hotvm`; one work queue per hypervisor host, named as the
host in hotvm.yaml; queue `fleet` for fleet-wide runs. A per-VM run must run on its VM's host's queue (only
that host's worker reaches the VM's QMP socket / libvirt / vCenter session).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable

from prefect.runtime import flow_run

from hotvm.config import Config
from hotvm.config_file import load_config
from hotvm.hypervisors.resolve import find_vm

POOL = "hotvm"
FLEET_QUEUE = "fleet"


def _day() -> str:
    start = flow_run.scheduled_start_time or dt.datetime.now(dt.UTC)
    return f"{start:%Y-%m-%d}"


def host_of(vm: str, config: str | Config | None) -> str | None:
    """The VM's host in hotvm.yaml (its work queue), or None when no host has it."""
    with contextlib.suppress(Exception):  # a name must never fail a run: the run itself reports the error
        return find_vm(load_config(config), vm)[0].name
    return None


def vm_run_name(verb: str) -> Callable[[], str]:
    """`backup web01@hv1 2026-12-05`: the VM, its host and the day, for the UI's run lists."""

    def name() -> str:
        params = flow_run.parameters or {}
        vm = str(params.get("vm") or "?")
        host = host_of(vm, params.get("config"))
        return f"{verb} {vm}{'@' + host if host else ''} {_day()}"

    return name


def fleet_run_name(flow_name: str, subject: str | None = None) -> Callable[[], str]:
    """`weekly-image default 2026-12-05`: the deployment (else the flow), what it covers, the day."""

    def name() -> str:
        from prefect.runtime import deployment

        params = flow_run.parameters or {}
        what = params.get(subject) if subject else None
        label = deployment.name or flow_name
        return " ".join(str(p) for p in (label, what, _day()) if p)

    return name


def vm_tags(kind: str, vm: str, host: str, policy: str | None = None) -> list[str]:
    """The tags every per-VM run carries (filter the UI by them; automations match `hotvm`)."""
    tags = ["hotvm", f"kind:{kind}", f"vm:{vm}", f"host:{host}"]
    return tags + ([f"policy:{policy}"] if policy else [])


def tag_this_run(tags: list[str]) -> None:
    """Add tags to the current run (a run started from the UI form has only its deployment's tags)."""
    run_id = flow_run.id
    if not run_id:
        return
    from prefect.client.orchestration import get_client

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:  # tags only help reading
        current = client.read_flow_run(run_id).tags or []
        missing = [t for t in tags if t not in current]
        if missing:
            client.update_flow_run(run_id, tags=[*current, *missing])


def current_queue() -> str | None:
    """The work queue of this deployment run (None: not a deployment run)."""
    run_id = flow_run.id
    from prefect.runtime import deployment

    if not run_id or not deployment.id:
        return None
    from prefect.client.orchestration import get_client

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).work_queue_name
    return None


def artifact_key(name: str) -> str:
    """A name as Prefect artifact keys allow it (lowercase letters, digits, dashes)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def nothing_configured(flow_name: str, add: str):  # noqa: ANN201 - a Completed state
    """A fleet run whose section of hotvm.yaml is absent (no offsite target, no tape, no standby): it ends
    Completed with one line and one artifact saying what to add. `prefect deploy --all` turns on every
    schedule, so such a run comes round whether or not the feature is used; failing would notify."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Completed

    line = f"nothing configured: add {add} to hotvm.yaml"
    get_run_logger().warning("%s: %s", flow_name, line)
    with contextlib.suppress(Exception):  # the state still says it
        create_markdown_artifact(
            f"# {flow_name}: nothing configured\n\nNothing to do: add {add} to hotvm.yaml.\n\n"
            "This deployment's schedule is on (`prefect deploy --all` turns every schedule on); until the "
            "section exists each run ends here, Completed. Pause the schedule in the UI if you do not want "
            "the runs at all.",
            key=f"{artifact_key(flow_name)}-nothing-configured",
            description=line,
        )
    return Completed(message=line, data={"nothing_configured": add})
