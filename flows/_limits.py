"""Per-host backup slots (the seed: 2-4 concurrent backups per host), never held by a dead run.

Two layers, because the server's leases alone let a killed run block the next one:
- On this machine: the host's N slot files, taken by flock (hotvm/locks.py). The kernel frees a slot the
  instant its holder dies. With the embedded server (no PREFECT_API_URL) this is the only layer: that
  server keeps leases in its own memory and dies with the CLI, so a killed run's lease would never expire.
- Across machines (a real Prefect server): the host's Prefect global concurrency limit, taken with the
  shortest lease the API allows (60 s) and renewed while the holder lives. A holder killed on another
  machine frees it when the lease runs out (60 s + the server's repossessor loop, 15 s by default). A
  holder killed on this machine is given back at once: its lease id is in the slot file it held, and the
  next holder of that file releases it before taking its own.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_URL

from hotvm.locks import HeldSlot, host_slot_lock, vm_lock

LEASE_S = 60
"""The shortest lease Prefect accepts (its API answers 422 below): how long a remote dead holder blocks."""
MAX_POLL_S = 2.0
"""Longest wait between two tries for a server slot (the server's Retry-After can be minutes)."""

T = TypeVar("T")


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


def server_keeps_leases() -> bool:
    """False with the embedded server: it dies with this process, and its leases (in its memory) with it."""
    return bool(PREFECT_API_URL.value())


@contextmanager
def backup_slot(host: str, limit: int, vm: str, reconcile: Callable[[], T]) -> Iterator[T]:
    """Everything a run that puts overlays on a VM holds, in this order:

    1. the VM's lock (one backup per VM at a time, image or files). Getting it proves that no live run
       is reading the VM's overlays, so
    2. `reconcile()` commits back what a killed run left, right away: a dead run's VM is back on its disk
       before this run waits for anything;
    3. a host slot (`host_slot`). Yields what `reconcile()` returned."""
    with vm_lock(host, vm):
        reconciled = reconcile()
        with host_slot(host, limit):
            yield reconciled


@contextmanager
def host_slot(host: str, limit: int) -> Iterator[None]:
    """One of the host's `limit` slots: a local slot file, then (on a real server) the global limit."""
    log = get_run_logger()

    def waiting() -> None:
        log.info("all %d backup slots of host %s are taken on this machine: waiting for one", limit, host)

    with host_slot_lock(host, limit, on_wait=waiting) as slot:
        if not server_keeps_leases():
            yield
            return
        name = ensure_host_limit(host, limit)
        dead = _lease_in(slot)
        if dead and _release(dead):
            log.warning("gave back the host-%s slot of a killed run (lease %s)", host, dead)
        lease = _take_server_slot(name)
        slot.record(f"pid {os.getpid()} lease {lease}")
        try:
            with _renewed(lease):
                yield
        finally:
            if _release(lease):
                slot.record(f"pid {os.getpid()}")  # nothing left for the next holder to give back


_LEASE = re.compile(r"\blease ([0-9a-f-]{36})\b")


def _lease_in(slot: HeldSlot) -> str | None:
    found = _LEASE.search(slot.left_behind)
    return found.group(1) if found else None


def _take_server_slot(name: str) -> str:
    """A slot of the global limit `name` under a `LEASE_S` lease, waiting for one; returns the lease id."""
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S
                )
                return str(response.json()["lease_id"])
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != httpx.codes.LOCKED:
                    raise
                time.sleep(min(float(exc.response.headers.get("Retry-After", 1)), MAX_POLL_S))


@contextmanager
def _renewed(lease: str) -> Iterator[None]:
    """Keep the lease alive while the body runs (a renewer thread of this process: it dies with it)."""
    stop = threading.Event()
    renewer = threading.Thread(target=_keep_renewing, args=(lease, stop), name=f"lease-{lease}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _keep_renewing(lease: str, stop: threading.Event) -> None:
    """Renew a third of the way into each lease: two renewals may fail before the slot is lost."""
    from prefect.logging import get_logger

    while not stop.wait(LEASE_S / 3):
        try:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id=lease, lease_duration=LEASE_S)
        except Exception as exc:  # noqa: BLE001 - the backup goes on; the local slot still holds
            get_logger("hotvm.slots").warning("could not renew host slot lease %s: %s", lease, exc)


def _release(lease: str) -> bool:
    """Give a lease's slot back (an unknown or expired lease is a no-op on the server)."""
    from prefect.logging import get_logger

    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease)
    except Exception as exc:  # noqa: BLE001 - the server frees it when the lease runs out
        get_logger("hotvm.slots").warning("could not give back host slot lease %s: %s", lease, exc)
        return False
    return True
