"""Per-host backup slots (the seed: 2-4 concurrent backups per host), as Prefect global concurrency limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from hotvm.locks import vm_lock


def host_limit_name(host: str) -> str:
    return f"hotvm-backups-{host}"


def ensure_host_limit(host: str, limit: int) -> str:
    """Create or resize the host's limit so the config file stays the single place it is set."""
    name = host_limit_name(host)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit)
        except ObjectAlreadyExists:  # the upsert is not atomic: a concurrent run created it meanwhile
            client.upsert_global_concurrency_limit_by_name(name, limit)
    return name


_local_lock = threading.Lock()
_local_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}


@contextmanager
def local_host_slot(host: str, limit: int) -> Iterator[None]:
    """A FIFO-ish in-process queue in front of the host's global limit (taken outside it).

    The global limit is what caps a host across processes and deployments, but a run waiting on it polls
    the server (Retry-After ~ the average slot occupancy, jittered): a freed slot can sit idle for seconds.
    Threads of one run (backup_policy / backup_host) queue here instead, and the next one takes the global
    slot the moment the previous one releases it."""
    with _local_lock:
        slot = _local_slots.setdefault((host, limit), threading.BoundedSemaphore(limit))
    with slot:
        yield


@contextmanager
def backup_slot(host: str, limit: int, vm: str) -> Iterator[None]:
    """Everything a run that puts overlays on a VM must hold, in this order: the host's slot (in-process
    queue, then the Prefect global limit; the shortest lease Prefect takes, renewed while the run lives,
    so a killed run frees its slot within a minute) and the VM's own lock (one backup per VM at a time,
    image or files: a second run would reconcile the overlays the first one is reading from)."""
    name = ensure_host_limit(host, limit)
    with (
        local_host_slot(host, limit),
        concurrency(name, occupy=1, strict=True, lease_duration=60),
        vm_lock(host, vm),
    ):
        yield
