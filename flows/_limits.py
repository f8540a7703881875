"""Per-host backup slots (the seed: 2-4 concurrent backups per host), as Prefect global concurrency limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists


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
