"""recover: restore every VM of a tier (1 = first) into DIR/<vm>/, in recovery order (startup_order, then
name), at most each host's max_concurrent_backups at once; reports measured time vs RTO per VM."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._runs import fleet_run_name
from hotvm.errors import HotvmError, RunFailed
from hotvm.verify import recover_tier


@flow(name="recover", flow_run_name=fleet_run_name("recover", "tier"))
def recover(
    tier: int,
    to: str,
    target: str | None = None,
    boot_check: bool = False,
    fmt: str = "qcow2",
    config: str | None = None,
) -> list[dict]:
    """Restore every VM of `tier` into `to`/<vm>/ in recovery order and compare each time with its RTO.

    Args:
        tier: The recovery tier (1 = first) whose VMs are restored.
        to: Directory on the worker to restore into (one sub-directory per VM).
        target: The target's name in hotvm.yaml; empty: the default target.
        boot_check: Boot each restored VM isolated until its ready pattern.
        fmt: Format of the restored disks: qcow2 or raw.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    if fmt not in ("qcow2", "raw"):
        raise HotvmError(f"unknown disk format '{fmt}'", "use qcow2 or raw")
    rows = recover_tier(config, tier, to, target, boot_check=boot_check, fmt=fmt)  # type: ignore[arg-type]
    create_table_artifact(
        [
            {
                "order": r["order"],
                "vm": r["vm"],
                "host": r["host"],
                "seconds": r["seconds"],
                "rto_s": r["rto_s"],
                "meets_rto": r["meets_rto"],
                "ok": r["ok"],
                "problems": "; ".join(r.get("problems") or []),
            }
            for r in rows
        ],
        key=f"recover-tier-{tier}",
        description=f"recovery of tier {tier} into {to}",
    )
    log = get_run_logger()
    for r in rows:
        if not r.get("verified"):
            log.error("recovery of %s failed: %s", r["vm"], "; ".join(r.get("problems") or []))
        elif r["meets_rto"] is False:
            log.error("recovery of %s took %.1f s, over its RTO of %.0f s", r["vm"], r["seconds"], r["rto_s"])
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise RunFailed(
            f"{len(bad)} of {len(rows)} VM(s) of tier {tier} failed to recover or missed their RTO: "
            + ", ".join(r["vm"] for r in bad),
            f"see {to}/<vm>/ and the recover artifact",
            rows,
        )
    return rows
