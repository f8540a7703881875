"""offsite-copy: 3-2-1-1-0's offsite copy, e.g. daily after the image job, on the `fleet` queue.

    copy_sets (chunks the destination lacks, verified -> set files -> manifest last; documents)

The destination is a second location of the same repository: `hotvm list/restore/verify --target
DESTINATION` work from it alone (docs/copies.md).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._runs import fleet_run_name, nothing_configured
from hotvm.config_file import load_config
from tasks.copy import copy_sets

DEFAULT_DESTINATION = "offsite"
"""The deployment's destination: no target of that name = no offsite copy configured (not an error)."""


@flow(name="offsite-copy", flow_run_name=fleet_run_name("offsite-copy"))
def offsite_copy(
    destination: str, source: str | None = None, vms: list[str] | None = None, config: str | None = None
) -> dict:
    """Copy every complete backup set of `source` (default target) that `destination` lacks.

    Args:
        destination: The destination target's name in hotvm.yaml (the offsite copy).
        source: The source target's name; empty: the default target.
        vms: Only these VMs' sets; empty: every VM.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    if destination == DEFAULT_DESTINATION and all(t.name != destination for t in load_config(config).targets):
        return nothing_configured(
            "offsite-copy", f"a target named '{destination}' (targets:, the offsite copy's destination)"
        )
    report = copy_sets(source, destination, vms or None, config)
    rows = [
        {"kind": s["kind"], "vm": s["vm"], "backup": s["backup_id"], "action": s["action"],
         "files": s["files_sent"], "MiB": round(s["bytes_sent"] / 2**20, 1), "reason": s["reason"]}
        for s in report["sets"]
    ]
    create_table_artifact(
        rows, key=f"offsite-copy-{_key(report['destination'])}",
        description=f"copy of '{report['source']}' to '{report['destination']}': {report['copied']} set(s), "
        f"{report['chunks_sent']} chunk(s) sent, {report['chunks_present']} already there",
    )
    get_run_logger().info(
        "copied %d set(s) from %s to %s: %d chunk(s), %.1f MiB sent in %.1f s", report["copied"],
        report["source"], report["destination"], report["chunks_sent"], report["bytes_sent"] / 2**20,
        report["seconds"],
    )
    return report


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
