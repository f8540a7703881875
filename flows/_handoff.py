"""A per-VM run on the wrong work queue hands its work to the right one (docs/scale-out.md).

The per-VM deployments (backup-vm, files-vm, verify-vm, recover-vm, sync-vm, restore-vm, instant-restore)
default to work queue `fleet`, which the fleet worker polls, so **Run** in the UI always starts something.
A VM's work must happen on its host's worker (only that machine reaches the VM's QMP socket, or the standby's
vm_dir), so a run that finds itself elsewhere starts the same deployment with the same parameters on the
right queue through `run_deployment` (linked to it as a subflow, so it shows in its graph), waits for that
run and ends in its state. "Run backup-vm vm=web01" from the UI thus backs web01 up on hv1's worker.

strict (backup, files, sync): every other queue hands off. Not strict (verify, recover, instant restore):
only a queue that is no host's (`fleet`, `default`) hands off; a host's queue chosen in the Run form is
kept (recover a VM on a surviving host when its own is gone).
"""

from __future__ import annotations

import time
from typing import Any

from prefect.runtime import deployment

from flows._runs import current_queue, tag_this_run, vm_tags
from hotvm.config import Config
from hotvm.config_file import load_config


def handed_off(
    kind: str, vm: str, queue: str | None, config: str | Config | None, strict: bool = True,
    policy: str | None = None,
) -> Any:  # noqa: ANN401 - None, or the final State of the run that did the work
    """None: this run does the work where it is. Else the work ran on work queue `queue` as a child run of
    this one (see flows/_fleet.PER_VM for `kind`), and this is the state this run ends in."""
    if not queue or not deployment.id:
        return None
    here = current_queue()
    if here is None or here == queue:
        return None
    if not strict and here in {h.name for h in load_config(config).hosts}:
        return None
    return _run_on(kind, vm, queue, here, policy)


def _run_on(kind: str, vm: str, queue: str, here: str, policy: str | None) -> Any:  # noqa: ANN401
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Completed, Failed
    from prefect.utilities.urls import url_for

    from flows._fleet import POLL_S, _mirror_on_parent_graph, _start_child

    log = get_run_logger()
    tag_this_run(vm_tags(kind, vm, queue, policy))  # found by the same filters (vm:web01) as its child
    with get_client(sync_client=True) as client:
        child = _start_child(client, kind, queue, vm, dict(flow_run.parameters or {}), policy)
        log.info(
            "%s belongs on work queue '%s', this run is on '%s': started '%s' there, waiting for it: %s",
            vm, queue, here, child.name, url_for(child) or child.id,
        )  # fmt: skip
        while child.state is None or not child.state.is_final():
            time.sleep(POLL_S)
            child = client.read_flow_run(child.id)
        _mirror_on_parent_graph(client, child)
    message = child.state.message or ""
    if child.state.is_completed():
        log.info("'%s' on work queue '%s' completed: %s", child.name, queue, message)
        return Completed(message=f"{message} (done by '{child.name}' on work queue {queue})")
    tag_this_run([t for t in child.tags if t.startswith("step:")])  # the notification names the step
    error = message.removeprefix("Flow run encountered an exception: ")
    log.error("'%s' on work queue '%s' ended %s: %s", child.name, queue, child.state.name, error)
    return Failed(
        message=f"'{child.name}' on work queue {queue} ended {child.state.name}: {error} (retry that run, "
        "or this one: it retries that run)"
    )
