"""verify: automatic restore tests (seed: "test test test"), and scrub: checksum-only check of every set.

verify restores the latest (or the given) backup of each VM, or a rotating `sample` of VMs least recently
tested first, into a scratch directory (every chunk checked), optionally boots it isolated until its ready
pattern, and records the result beside the set: the time to ready is the VM's measured RTO. A failure marks
the set unverified (its restore-test record has verified=false), is logged at ERROR naming the damaged
chunk/disk/file, and fails the run after every VM was tested.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment
from prefect.states import Completed

from flows._fleet import fan_out, publish
from flows._handoff import handed_off
from flows._retried import completed_hook
from flows._runs import FLEET_QUEUE, artifact_key, fleet_run_name, host_of, tag_this_run, vm_run_name, vm_tags
from hotvm.errors import HotvmError, RunFailed
from tasks.verify import select_vms, verify_set


def verify_rows(results: list[dict]) -> list[dict]:
    return [
        {
            "vm": r["vm"],
            "backup_id": r["backup_id"],
            "mode": r.get("mode"),
            "verified": r["verified"],
            "restore_s": r.get("restore_seconds"),
            "boot_s": (r.get("boot_check") or {}).get("seconds"),
            "ready_s": r.get("seconds_to_ready"),
            "problems": "; ".join(r.get("problems") or []),
        }
        for r in results
    ]


@flow(name="verify", flow_run_name=fleet_run_name("verify", "vm"))
def verify(
    vm: str | None = None,
    backup_id: str | None = None,
    target: str | None = None,
    boot: bool = False,
    keep: bool = False,
    sample: int | None = None,
    config: str | None = None,
) -> list[dict]:
    """Restore-test one VM, every VM on the target, or `sample` of them (least recently tested first).

    Args:
        vm: Only this VM; empty: every VM on the target (or `sample` of them).
        backup_id: This backup set of `vm`; empty: its latest complete one.
        target: The target's name in hotvm.yaml; empty: the default target.
        boot: Also boot each restored VM isolated until its ready pattern (its measured RTO).
        keep: Keep the scratch restores (for a look); default: removed after the test.
        sample: Test only this many VMs, least recently tested first; empty: all.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    if backup_id and not vm:
        raise HotvmError("a backup id needs a VM", "pass vm= with backup_id=")
    vms = [vm] if vm else select_vms(config, target, sample)
    if deployment.id and not backup_id:  # from the UI: one verify-vm run per VM, on its host's worker
        params = {"target": target, "boot": boot, "keep": keep, "config": config}
        rows = fan_out(vms, "verify", params, config)
        key = "verify-" + artifact_key(vm or "all")
        return publish(rows, key, "restore tests", "the target", "restore test", "restore tests")
    results = [verify_set(v, target, backup_id, boot, keep, config) for v in vms]
    create_table_artifact(
        verify_rows(results),
        key="verify-" + artifact_key(vm or "all"),
        description=f"restore tests ({'boot' if boot else 'checksums'})",
    )
    failed = [r for r in results if not r["verified"]]
    if failed:
        raise RunFailed(
            f"{len(failed)} of {len(results)} restore test(s) failed: "
            + "; ".join(f"{r['vm']} {r['backup_id']}: {', '.join(r['problems'])}" for r in failed),
            "those sets are marked unverified; back the VMs up again or restore an older set",
            results,
        )
    get_run_logger().info("%d restore test(s) passed", len(results))
    return results


@flow(name="verify-vm", flow_run_name=vm_run_name("verify"), on_completion=[completed_hook])
def verify_vm(
    vm: str,
    backup_id: str | None = None,
    target: str | None = None,
    boot: bool = False,
    keep: bool = False,
    config: str | None = None,
):  # noqa: ANN201 - a Completed state carrying the result
    """Restore-test one VM's latest (or given) backup set; the verify deployment starts one per VM.

    Args:
        vm: The VM whose backup is tested (also a VM that is only on the target).
        backup_id: This backup set; empty: the VM's latest complete one.
        target: The target's name in hotvm.yaml; empty: the default target.
        boot: Also boot the restored VM isolated until its ready pattern (its measured RTO).
        keep: Keep the scratch restore (for a look); default: removed after the test.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    host = host_of(vm, config)
    if (handed := handed_off("verify", vm, host, config, strict=False)) is not None:
        return handed  # started on fleet from the UI: restore-tested on the VM's host's worker
    tag_this_run(vm_tags("verify", vm, host or FLEET_QUEUE))
    result = verify_set(vm, target, backup_id, boot, keep, config)
    if not result["verified"]:
        tag_this_run(["step:verify"])
        raise RunFailed(
            f"restore test of {vm} {result['backup_id']} failed: {'; '.join(result['problems'])}",
            "the set is marked unverified; back the VM up again or restore an older set",
            [result],
        )
    ready = result.get("seconds_to_ready")
    detail = f", ready in {ready:.1f} s" if ready is not None else ""
    return Completed(message=f"verified {result['backup_id']}{detail}", data=result)


@flow(name="scrub", flow_run_name=fleet_run_name("scrub", "target"))
def scrub(target: str | None = None, vm: str | None = None, config: str | None = None) -> dict:
    """Checksum-only verification of every set (= `hotvm check --read-data`), like a PBS verify job.

    Args:
        target: The target's name in hotvm.yaml; empty: the default target.
        vm: Only this VM's sets; empty: every set.
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    from hotvm.check import check_repository
    from hotvm.formats.opener import open_repository

    with open_repository(config, target) as repo:
        report = check_repository(repo, read_data=True, vm=vm)
    rows = [
        {
            "vm": s.vm,
            "backup_id": s.backup_id,
            "state": str(s.state),  # a SetState (StrEnum): its value
            "chunks": s.chunks,
            "problems": "; ".join(f"{p.kind}: {p.detail}" for p in s.problems),
        }
        for s in report.sets
    ]
    create_table_artifact(rows, key="scrub-" + artifact_key(report.target), description="checksum scrub")
    log = get_run_logger()
    for s in report.sets:
        for p in s.problems:
            log.error("scrub: %s %s: %s: %s", s.vm, s.backup_id, p.kind, p.detail)
    for p in report.problems:
        log.error("scrub: %s: %s", p.kind, p.detail)
    if not report.ok:
        raise HotvmError(
            f"scrub of target '{report.target}' found {report.problem_count} problem(s)",
            "see the scrub artifact; damaged sets cannot be restored",
        )
    return report.summary()
