"""The DR plan, kept outside the system it protects (seed: "stored outside of the system it is protecting",
copies in several places), and the RPO/RTO check as a deployment.

    plan_export   plan_document -> render md/html/xlsx -> plan/dr-plan-<stamp>.<ext> and
                  plan/dr-plan-latest.<ext> on every plan.export_targets (default: every target)
    plan_check    check_plan; the run fails if any VM violates its RPO or RTO (so it alerts)

Files are written through the repository, so an encrypted target keeps the plan encrypted: keep one
unencrypted copy where you can read it in a disaster, or the key outside the protected system
(docs/recovery-plan.md).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._runs import fleet_run_name
from hotvm.config_file import load_config
from hotvm.errors import HotvmError
from hotvm.formats.manifest import utcnow
from hotvm.plan import FORMATS, check_plan, plan_document, render, render_markdown


@task(name="write_plan", retries=2, retry_delay_seconds=5)
def write_plan(target: str, files: dict[str, bytes], config: str | None = None) -> list[str]:
    from hotvm.formats.opener import open_repository

    written = []
    with open_repository(config, target) as repo:
        for path, data in files.items():
            repo.write_file(path, data)
            written.append(repo.target.display(path))
    return written


@flow(name="plan-export", flow_run_name=fleet_run_name("dr-plan"))
def plan_export(config: str | None = None, formats: list[str] | None = None) -> dict:
    """Render the DR plan and write it to every export target (plan.export_targets, default: every one).

    Args:
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
        formats: Document formats to write: md, html, xlsx.
    """
    log = get_run_logger()
    formats = list(formats or ["md", "html"])
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise HotvmError(f"unknown plan format(s) {', '.join(unknown)}", f"use {', '.join(FORMATS)}")
    cfg = load_config(config)
    now = utcnow()
    doc = plan_document(cfg, now=now)
    stamp = f"{now:%Y%m%dT%H%M%SZ}"
    files: dict[str, bytes] = {}
    for fmt in formats:
        data = render(doc, fmt)
        files[f"plan/dr-plan-{stamp}.{fmt}"] = data
        files[f"plan/dr-plan-latest.{fmt}"] = data
    targets = cfg.plan.export_targets or [t.name for t in cfg.targets]
    written: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    for name in targets:
        try:
            written[name] = write_plan(name, files, config)
        except HotvmError as exc:  # one unreachable target must not stop the other copies
            failed[name] = exc.message
            log.error("DR plan not written to target '%s': %s", name, exc.message)
    create_markdown_artifact(render_markdown(doc), key="dr-plan", description=f"DR plan {stamp}")
    log.info(
        "DR plan %s written to %s (%d violation(s))",
        stamp,
        ", ".join(written) or "no target",
        len(doc.violations),
    )
    if not written:
        raise HotvmError("the DR plan could not be written to any target", "; ".join(failed.values()))
    return {"stamp": stamp, "written": written, "failed": failed, "violations": doc.violations}


@flow(name="plan-check", flow_run_name=fleet_run_name("plan-check"))
def plan_check(config: str | None = None) -> list[dict]:
    """Fail the run if any VM's schedules miss its RPO, it lacks file-level backup it needs, or its last
    measured restore misses its RTO (or it was never tested).

    Args:
        config: Path of hotvm.yaml on the worker; empty: $HOTVM_CONFIG of the worker, else ./hotvm.yaml.
    """
    violations = [v.as_dict() for v in check_plan(load_config(config))]
    if violations:
        create_table_artifact(violations, key="plan-check", description=f"{len(violations)} violation(s)")
        for v in violations:
            get_run_logger().error("%s (%s): %s", v["vm"], v["check"], v["detail"])
        raise HotvmError(f"{len(violations)} RPO/RTO violation(s)", "run 'hotvm plan check' and fix them")
    get_run_logger().info("every VM meets its RPO and RTO")
    return violations
