"""recover: restore every VM of a tier (1 = first) into DIR/<vm>/, in recovery order (startup_order, then
name), at most each host's max_concurrent_backups at once; reports measured time vs RTO per VM.

From the CLI every VM is restored in this process. As a deployment (the UI), each VM is its own
`recover-vm` run on the work queue of its host (that worker restores into `to` on its machine), started
in recovery order and retryable on its own (flows/_fleet.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment
from prefect.states import Completed

from flows._fleet import fan_out, publish
from flows._handoff import handed_off
from flows._retried import completed_hook
from flows._runs import FLEET_QUEUE, fleet_run_name, host_of, tag_this_run, vm_run_name, vm_tags
from hotvm.errors import HotvmError, RunFailed
from hotvm.restore import check_disk_format
from hotvm.verify import recover_tier, recovery_plan
from hotvm.verify import recover_vm as recover_one


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
    check_disk_format(fmt)
    if deployment.id:  # from the UI: one recover-vm run per VM, in recovery order, on its host's worker
        vms = [p["vm"] for p in recovery_plan(config, tier, target)]
        if not vms:
            raise HotvmError(f"no VM of tier {tier} has a complete backup", "check the tiers in hotvm.yaml")
        params = {"tier": tier, "to": to, "target": target, "boot_check": boot_check, "fmt": fmt,
                  "config": config}  # fmt: skip
        rows = fan_out(vms, "recover", params, config, in_order=True)
        return publish(rows, f"recover-tier-{tier}", f"recovery of tier {tier} into {to}", f"tier {tier}",
                       "recovery", "VM recoveries")  # fmt: skip
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


@flow(name="recover-vm", flow_run_name=vm_run_name("recover"), on_completion=[completed_hook])
def recover_vm(
    vm: str,
    to: str,
    tier: int = 1,
    target: str | None = None,
    boot_check: bool = False,
    fmt: str = "qcow2",
    config: str | None = None,
):  # noqa: ANN201 - a Completed state carrying the row
    """Restore the latest backup of `vm` into `to`/`vm`/ and compare the time with its RTO.

    Args:
        vm: The VM to recover (also a VM that is only on the target).
        to: Directory on the worker to restore into (the VM gets its own sub-directory).
        tier: The recovery tier the VM belongs to (for the report).
        target: The target's name in hotvm.yaml; empty: the default target.
        boot_check: Boot the restored VM isolated until its ready pattern.
        fmt: Format of the restored disks: qcow2 or raw.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    check_disk_format(fmt)
    host = host_of(vm, config)
    if (handed := handed_off("recover", vm, host, config, strict=False)) is not None:
        return handed  # started on fleet from the UI: restored by the VM's host's worker
    tag_this_run([*vm_tags("recover", vm, host or FLEET_QUEUE), f"tier:{tier}"])
    row = recover_one(config, vm, to, target, tier=tier, boot_check=boot_check, fmt=fmt)  # type: ignore[arg-type]
    if not row["ok"]:
        tag_this_run(["step:restore" if not row.get("verified") else "step:rto"])
        slow = f"took {row['seconds']:.1f} s, over its RTO of {row['rto_s'] or 0:.0f} s"
        why = "; ".join(row.get("problems") or []) or slow
        raise RunFailed(f"recovery of {vm} failed: {why}", f"see {row['to']}; retry this run", [row])
    rto = f" (RTO {row['rto_s']:.0f} s)" if row["rto_s"] is not None else ""
    return Completed(message=f"recovered {row.get('backup_id', '')} in {row['seconds']:.1f} s{rto}", data=row)
