"""Per-host backup slots (the seed: 2-4 concurrent backups per host), as Prefect global concurrency limits."""

from __future__ import annotations

from prefect.client.orchestration import get_client


def host_limit_name(host: str) -> str:
    return f"hotvm-backups-{host}"


def ensure_host_limit(host: str, limit: int) -> str:
    """Create or resize the host's limit so the config file stays the single place it is set."""
    name = host_limit_name(host)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)
    return name
