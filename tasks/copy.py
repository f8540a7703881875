"""The copy step: one task over hotvm.copy. Retried like every step: a retry resumes (what arrived is
skipped), so it never sends anything twice."""

from __future__ import annotations

from prefect import task

from hotvm.copy import copy_between
from tasks._options import STEP


@task(name="copy_sets", **STEP)
def copy_sets(source: str | None, destination: str, vms: list[str] | None, config: str | None = None) -> dict:
    """Every complete set `destination` lacks, only its missing chunks, verified, manifest last."""
    return copy_between(config, source, destination, vms).summary()
