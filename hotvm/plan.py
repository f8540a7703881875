"""RPO, RTO and tiers per VM, their checks, and the DR plan document (docs/recovery-plan.md).

    effective settings (pure)   the VM's policy, with its rpo / rto / tier overridden by the VM
    schedule_rpo (pure)         longest gap between protection points of the image + files crons
    gather_evidence (I/O)       per VM: its latest complete sets, restore-test records, tape copies
    check_vm (pure)             violations: RPO not met by the schedules, no files: though file restores
                                are asked for, last measured restore slower than the RTO or never tested
    plan_document (pure)        the DR plan: tiers, VMs in recovery order, where to restore from, how
    render_markdown / render_html / render_xlsx
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from hotvm.config import Config, HostConfig, Policy, TargetConfig, VMConfig, format_duration
from hotvm.formats.manifest import utcnow
from hotvm.hypervisors.resolve import resolve_vms
from hotvm.policies import policy_for_vm

if TYPE_CHECKING:
    from hotvm.formats.repository import Repository

SCHEDULE_WINDOW = dt.timedelta(days=400)
"""Long enough for monthly and yearly-ish crons to repeat; all crons are evaluated in UTC."""
SCHEDULE_START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MAX_POINTS = 50_000
"""Per cron: a cron firing every minute stops after this many points (its gap is a minute anyway)."""
RESTORE_DIR = "/var/lib/hotvm/restores"
FORMATS = ("md", "html", "xlsx")


# --------------------------------------------------------------------------- pure: schedules


def schedule_rpo(crons: list[str], start: dt.datetime = SCHEDULE_START,
                 window: dt.timedelta = SCHEDULE_WINDOW) -> dt.timedelta | None:
    """Longest gap between consecutive protection points of all `crons` together over `window`
    (weekly image alone: 7 d; with daily files: 24 h). None: no schedule."""
    from cronsim import CronSim

    if not crons:
        return None
    end = start + window
    points: set[dt.datetime] = set()
    for expr in crons:
        last = None
        for n, when in enumerate(CronSim(expr, start)):
            if when > end or n >= MAX_POINTS:
                break
            points.add(when)
            last = when
        if last is not None and n >= MAX_POINTS:
            end = min(end, last)
    times = sorted(p for p in points if p <= end)
    if len(times) < 2:
        return window  # fires at most once a window: no better than that
    return max(b - a for a, b in zip(times, times[1:], strict=False))


# --------------------------------------------------------------------------- pure: effective settings


@dataclass
class VMPlan:
    vm: str
    host: str
    policy: str | None
    tier: int
    rpo: dt.timedelta | None
    rto: dt.timedelta | None
    file_restores: bool
    schedules: list[str]
    """The crons that make protection points (image, files)."""
    schedule_rpo: dt.timedelta | None
    image_target: str | None
    files: dict | None
    tape: str | None
    startup_order: int | None
    contacts: str | None
    notes: str | None
    index: int = 0
    external_data: list[str] = field(default_factory=list)
    copies_required: dict = field(default_factory=dict)
    """The policy's `copies:` ({offsite: bool, immutable: bool}): what plan check requires (3-2-1-1-0)."""


def _target_name(config: Config, name: str | None) -> str | None:
    if name is not None:
        return name
    defaults = [t.name for t in config.targets if t.default]
    if defaults:
        return defaults[0]
    return config.targets[0].name if len(config.targets) == 1 else None


def vm_plan(config: Config, host: HostConfig, vm: VMConfig, index: int = 0) -> VMPlan:
    policy: Policy | None = policy_for_vm(config, vm.name)
    schedules = []
    if policy is not None:
        schedules.append(policy.image.schedule)
        if policy.files is not None:
            schedules.append(policy.files.schedule)
    files = None
    if policy is not None and policy.files is not None:
        files = {"schedule": policy.files.schedule, "target": _target_name(config, policy.files.target)}
    return VMPlan(
        vm=vm.name,
        host=host.name,
        policy=policy.name if policy else None,
        tier=vm.tier if vm.tier is not None else (policy.tier if policy else 3),
        rpo=vm.rpo if vm.rpo is not None else (policy.rpo if policy else None),
        rto=vm.rto if vm.rto is not None else (policy.rto if policy else None),
        file_restores=vm.file_restores,
        schedules=schedules,
        schedule_rpo=schedule_rpo(schedules),
        image_target=_target_name(config, policy.image.target) if policy else None,
        files=files,
        tape=policy.tape.tape if policy and policy.tape else None,
        startup_order=vm.startup_order,
        contacts=vm.contacts,
        notes=vm.notes,
        index=index,
        external_data=list(vm.external_data),
        copies_required=policy.copies.model_dump() if policy else {},
    )


def vm_plans(config: Config, vms: Iterable[tuple[HostConfig, VMConfig]] | None = None) -> list[VMPlan]:
    """Every VM of `vms` (default: resolved now, failing on a host that cannot be listed) in recovery
    order: tier, then startup_order (if set), then config order."""
    pairs = vms if vms is not None else resolve_vms(config).require()
    plans = [vm_plan(config, h, v, i) for i, (h, v) in enumerate(pairs)]
    return sorted(plans, key=lambda p: (p.tier, p.startup_order is None, p.startup_order or 0, p.index))


# --------------------------------------------------------------------------- evidence (I/O)


@dataclass
class Evidence:
    """What the VM's image target holds for it."""

    latest: dict | None = None
    """The newest complete set: backup_id, completed_at, target, url."""
    restore_test: dict | None = None
    """The newest restore-test record of the VM's sets: backup_id, tested_at, seconds, ok."""
    tape_copy: dict | None = None
    """The newest tape copy holding a set of the VM: tape, copy_id, backup_id, media, expires."""
    copies: list[dict] = field(default_factory=list)
    """Every target holding a complete set of the VM (the image target first, then the copies made by
    `hotvm copy`): target, role (primary | copy), backup_id, completed_at, immutable, retained_until,
    verified (the newest set's last restore test there passed: True/False; None: never tested there)."""
    error: str | None = None


def _restore_tests(repo, vm: str, backup_id: str) -> list[dict]:  # noqa: ANN001 - Repository
    set_dir = repo.set_path(vm, backup_id)
    records = []
    for name in repo.target.listdir(f"{set_dir}/restore-tests"):
        if not name.endswith(".json") or ".tmp-" in name:
            continue
        try:
            body = json.loads(repo.read_file(f"{set_dir}/restore-tests/{name}"))
        except Exception:  # noqa: BLE001 - a torn or unauthentic record is no evidence
            continue
        check = body.get("boot_check") if isinstance(body, dict) else None
        if not isinstance(check, dict) or not isinstance(check.get("seconds"), int | float):
            continue
        # A checksum-only verify restores but never boots: it measures no time to ready, so no RTO.
        ready = body.get("seconds_to_ready")  # hotvm verify --boot: restore + boot
        seconds = float(ready) if isinstance(ready, int | float) else float(check["seconds"])
        stream = body.get("stream_seconds")  # instant boot test: the time until no repository is needed
        records.append({
            "backup_id": backup_id, "tested_at": str(body.get("tested_at") or name[:-5]),
            "seconds": seconds, "ok": bool(check.get("ok", True)) and body.get("verified", True) is not False,
            "mode": str(body.get("mode") or "boot"),
            "stream_seconds": float(stream) if isinstance(stream, int | float) else None,
        })
    return records


def _tape_copy(repo, vm: str) -> dict | None:  # noqa: ANN001 - Repository
    from hotvm.tape.copy import stored_catalogs

    found = []
    for tape in repo.target.listdir("tapes"):
        try:
            catalogs = stored_catalogs(repo, tape)
        except Exception:  # noqa: BLE001 - an unreadable catalog: the tapes hold their own copy
            continue
        for catalog in catalogs:
            for entry in catalog.get("sets", []):
                if entry.get("vm") == vm:
                    media = sorted({p["medium"] for p in entry.get("parts", []) if "medium" in p})
                    found.append({
                        "tape": catalog.get("tape", tape), "copy_id": catalog["copy_id"],
                        "backup_id": entry["backup_id"], "media": media or catalog.get("media", []),
                        "created": catalog.get("created"), "expires": catalog.get("expires"),
                    })
    return max(found, key=lambda f: (f["backup_id"], f["created"] or "")) if found else None


def _copy_entry(repo, target_name: str, role: str, vm: str) -> dict | None:  # noqa: ANN001 - Repository
    """The newest complete set of `vm` on one target, as a line of the plan's copies."""
    from hotvm.immutability import set_retained_until
    from hotvm.verify import restore_tests

    sets = [e for e in repo.list_sets(vm) if e.manifest is not None]
    if not sets:
        return None
    m = sets[-1].manifest
    tests = [t for t in restore_tests(repo, m.vm, m.backup_id) if isinstance(t, dict)]  # checksums or boot
    until = set_retained_until(repo.target, repo.set_path(m.vm, m.backup_id))
    return {
        "target": target_name, "role": role, "url": repo.target.url, "backup_id": m.backup_id,
        "completed_at": m.completed_at.isoformat(), "immutable": until is not None,
        "retained_until": until.isoformat() if until else None,
        "verified": tests[-1].get("verified") is True if tests else None,
    }


class _Repositories:
    """Each target's repository, opened once for the whole plan and closed with `stack`."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack, self.opened = stack, {}

    def get(self, target: TargetConfig) -> Repository:
        from hotvm.formats.opener import open_repository

        if target.name not in self.opened:
            self.opened[target.name] = self.stack.enter_context(open_repository(target))
        return self.opened[target.name]


def gather_copies(config: Config, plans: list[VMPlan], repos: _Repositories) -> dict[str, list[dict]]:
    """Per VM, every target that holds a complete set of it (an unreachable target: an entry with its
    error, so the plan shows the copy could not be seen)."""
    from hotvm.errors import HotvmError

    out: dict[str, list[dict]] = {p.vm: [] for p in plans}
    for t in config.targets:
        try:
            repo = repos.get(t)
            for p in plans:
                entry = _copy_entry(repo, t.name, "primary" if t.name == p.image_target else "copy", p.vm)
                if entry is not None:
                    out[p.vm].append(entry)
        except (HotvmError, OSError) as exc:
            for p in plans:
                out[p.vm].append({"target": t.name, "role": "unknown",
                                  "error": getattr(exc, "message", None) or str(exc)})
    for entries in out.values():
        entries.sort(key=lambda c: (c["role"] != "primary", c["target"]))
    return out


def gather_evidence(config: Config, plans: list[VMPlan]) -> dict[str, Evidence]:
    """Read each VM's image target once: latest complete set, restore tests of its sets, tape catalogs."""
    with ExitStack() as stack:
        return _gather_evidence(config, plans, _Repositories(stack))


def _gather_evidence(config: Config, plans: list[VMPlan], repos: _Repositories) -> dict[str, Evidence]:
    from hotvm.errors import HotvmError

    out: dict[str, Evidence] = {}
    for p in plans:
        ev = out[p.vm] = Evidence()
        if p.image_target is None:
            ev.error = "no image target (no policy, or several targets and none is the default)"
            continue
        try:
            repo = repos.get(config.find_target(p.image_target))
            sets = [e.manifest for e in repo.list_sets(p.vm) if e.manifest is not None]
            if sets:
                m = sets[-1]
                ev.latest = {
                    "backup_id": m.backup_id, "completed_at": m.completed_at.isoformat(),
                    "target": p.image_target, "url": repo.target.url,
                }
            tests = [t for m in sets for t in _restore_tests(repo, m.vm, m.backup_id)]
            if tests:
                ev.restore_test = max(tests, key=lambda t: (t["tested_at"], t["backup_id"]))
            ev.tape_copy = _tape_copy(repo, p.vm)
        except (HotvmError, OSError) as exc:
            ev.error = f"target '{p.image_target}': {getattr(exc, 'message', None) or exc}"
    for vm, copies in gather_copies(config, plans, repos).items():
        out[vm].copies = copies
    return out


# --------------------------------------------------------------------------- pure: checks


@dataclass
class Violation:
    vm: str
    host: str
    check: str  # policy, rpo, files, rto
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _d(value: dt.timedelta | None) -> str:
    return format_duration(value) if value is not None else "-"


def _check_copies(p: VMPlan, ev: Evidence, now: dt.datetime, bad) -> None:  # noqa: ANN001
    """3-2-1-1-0 per policy: `copies: {offsite: true, immutable: true}` each need a complete set no
    older than the RPO (without an RPO: any complete set)."""
    wanted = [(k, what) for k, what in (("offsite", "offsite copy"), ("immutable", "immutable copy"))
              if p.copies_required.get(k)]
    for key, what in wanted:
        found = [c for c in ev.copies if c.get("backup_id")
                 and (c["role"] == "copy" if key == "offsite" else c.get("immutable"))]
        if not found:
            hint = "hotvm copy --to TARGET" if key == "offsite" else "a target with immutable_days"
            bad("copies", f"no {what} of {p.vm} (policy {p.policy} requires one: {hint})")
            continue
        newest = max(found, key=lambda c: c["completed_at"])
        age = now - dt.datetime.fromisoformat(newest["completed_at"])
        if p.rpo is not None and age > p.rpo:
            bad("copies", f"newest {what} ({newest['backup_id']} on {newest['target']}) is {_d(age)} old, "
                          f"older than RPO {_d(p.rpo)}")


def check_vm(p: VMPlan, ev: Evidence, now: dt.datetime | None = None) -> list[Violation]:
    out: list[Violation] = []

    def bad(check: str, detail: str) -> None:
        out.append(Violation(p.vm, p.host, check, detail))

    if p.policy is None:
        bad("policy", "no policy covers this VM: it is not backed up")
    if p.rpo is not None and (p.schedule_rpo is None or p.schedule_rpo > p.rpo):
        got = f"schedules protect it every {_d(p.schedule_rpo)} at worst" if p.schedule_rpo else "no schedule"
        bad("rpo", f"RPO {_d(p.rpo)} not met: {got} ({', '.join(p.schedules) or 'none'})")
    if p.file_restores and p.files is None:
        bad("files", f"file_restores: true but policy '{p.policy}' has no files: (file-level backup)")
    if p.rto is not None:
        t = ev.restore_test
        if t is None:
            why = f"; {ev.error}" if ev.error else ""
            bad("rto", f"never tested: no measured restore of a current backup (RTO {_d(p.rto)}){why}")
        elif not t["ok"]:
            bad("rto", f"last restore test of {t['backup_id']} ({t['tested_at']}) did not come up")
        elif t["seconds"] > p.rto.total_seconds():
            bad("rto", f"last measured restore {t['seconds']:.0f} s ({t['tested_at']}, {t['backup_id']}) "
                       f"exceeds RTO {_d(p.rto)}")
    _check_copies(p, ev, now or utcnow(), bad)
    return out


def check_plan(config: Config) -> list[Violation]:
    plans = vm_plans(config)
    evidence = gather_evidence(config, plans)
    return [v for p in plans for v in check_vm(p, evidence[p.vm])]


# --------------------------------------------------------------------------- pure: the document


def restore_commands(p: VMPlan, ev: Evidence, restore_dir: str = RESTORE_DIR) -> list[str]:
    cmds = []
    if ev.latest:
        cmds.append(f"hotvm restore {p.vm} --backup {ev.latest['backup_id']} --target {ev.latest['target']} "
                    f"--to {restore_dir}/{p.vm}")
        cmds.append(f"hotvm restore {p.vm} --instant --start --backup {ev.latest['backup_id']} "
                    f"--target {ev.latest['target']} --to {restore_dir}/{p.vm}")  # up in seconds
    if ev.tape_copy:
        cmds.append(f"hotvm restore {p.vm} --from-tape {ev.tape_copy['tape']} "
                    f"--backup {ev.tape_copy['backup_id']} --to {restore_dir}/{p.vm}-tape")
    return cmds


@dataclass
class PlanDocument:
    generated_at: str
    contacts: list[str]
    notes: str | None
    tiers: list[dict] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_document(config: Config, evidence: dict[str, Evidence] | None = None,
                  now: dt.datetime | None = None, restore_dir: str = RESTORE_DIR) -> PlanDocument:
    plans = vm_plans(config)
    evidence = evidence if evidence is not None else gather_evidence(config, plans)
    doc = PlanDocument((now or utcnow()).strftime("%Y-%m-%d %H:%M UTC"), list(config.plan.contacts),
                       config.plan.notes)
    tiers: dict[int, list[dict]] = {}
    for p in plans:
        ev = evidence.get(p.vm, Evidence())
        violations = check_vm(p, ev, now)
        doc.violations += [v.as_dict() for v in violations]
        tiers.setdefault(p.tier, []).append({
            "vm": p.vm, "host": p.host, "policy": p.policy, "tier": p.tier, "startup_order": p.startup_order,
            "rpo": _d(p.rpo), "rto": _d(p.rto), "schedule_rpo": _d(p.schedule_rpo),
            "image": ev.latest, "files": p.files, "tape": ev.tape_copy,
            "measured": ev.restore_test, "commands": restore_commands(p, ev, restore_dir),
            "contacts": p.contacts, "notes": p.notes, "error": ev.error,
            "external_data": p.external_data, "copies": ev.copies,
            "violations": [v.detail for v in violations],
        })
    doc.tiers = [{"tier": t, "vms": vms} for t, vms in sorted(tiers.items())]
    return doc


def _instant(measured: dict) -> str:
    """' instant (full stream 40 s)' for a restore test that booted from the backup set."""
    if measured.get("mode") != "instant-boot":
        return ""
    stream = measured.get("stream_seconds")
    return " instant" + (f" (full stream {stream:.0f} s)" if stream is not None else "")


def _row(n: int, v: dict) -> dict[str, str]:
    """One VM as flat text cells (the table of every format)."""
    img, tape, meas = v["image"], v["tape"], v["measured"]
    media = ", ".join(tape["media"]) if tape else ""
    failed = "" if not meas or meas["ok"] else " FAILED"
    return {
        "#": str(n),
        "VM": v["vm"],
        "host": v["host"],
        "RPO": v["rpo"],
        "RTO": v["rto"],
        "schedules RPO": v["schedule_rpo"],
        "latest image": f"{img['backup_id']} ({img['completed_at'][:16]}) on {img['target']} {img['url']}"
        if img else "none",
        "tape": f"{tape['tape']} copy {tape['copy_id']} ({tape['backup_id']}) media {media}"
        if tape else "none",
        "measured restore": f"{meas['seconds']:.0f} s{_instant(meas)} ({meas['tested_at']}){failed}"
        if meas else "never tested",
        "status": "; ".join(v["violations"]) or "ok",
        "copies": "; ".join(_copy_text(c) for c in v.get("copies") or []) or "none",
    }


COLUMNS = ["#", "VM", "host", "RPO", "RTO", "schedules RPO", "latest image", "tape", "measured restore",
           "status", "copies"]


def _copy_text(c: dict) -> str:
    """One copy of a VM: where, its newest set, immutable until when, verified there or not."""
    if c.get("error"):
        return f"{c['target']}: unreadable ({c['error']})"
    lock = f", immutable until {c['retained_until'][:16]}" if c.get("immutable") else ""
    verified = {True: "verified", False: "verify FAILED", None: "not verified"}[c.get("verified")]
    return f"{c['target']} ({c['role']}): {c['backup_id']}{lock}, {verified}"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: PlanDocument) -> str:
    lines = [f"# Disaster recovery plan ({doc.generated_at})", ""]
    if doc.contacts:
        lines += ["Contacts: " + ", ".join(doc.contacts), ""]
    if doc.notes:
        lines += [doc.notes, ""]
    lines += [f"Problems: {len(doc.violations)} (see `hotvm plan check`)." if doc.violations
              else "Every VM meets its RPO and RTO.", ""]
    for tier in doc.tiers:
        lines += [f"## Tier {tier['tier']}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for n, v in enumerate(tier["vms"], 1):
            lines.append("| " + " | ".join(_md_cell(c) for c in _row(n, v).values()) + " |")
        lines.append("")
        for n, v in enumerate(tier["vms"], 1):
            lines += [f"### {n}. {v['vm']} (host {v['host']}, policy {v['policy'] or 'none'})", ""]
            if v["files"]:
                lines.append(f"- file-level backup: `{v['files']['schedule']}` to {v['files']['target']}")
            if v["contacts"]:
                lines.append(f"- contacts: {v['contacts']}")
            if v["notes"]:
                lines.append(f"- notes: {v['notes']}")
            if v["external_data"]:
                lines.append("- data outside disks (restore separately): " + ", ".join(v["external_data"]))
            if v["error"]:
                lines.append(f"- warning: {v['error']}")
            lines += ["", "```sh", *(v["commands"] or [f"# no backup of {v['vm']} found"]), "```", ""]
    return "\n".join(lines)


def render_html(doc: PlanDocument) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             f"<title>Disaster recovery plan ({e(doc.generated_at)})</title>",
             "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px;"
             "vertical-align:top}pre{background:#eee;padding:6px}</style></head><body>",
             f"<h1>Disaster recovery plan ({e(doc.generated_at)})</h1>"]
    if doc.contacts:
        parts.append("<p>Contacts: " + e(", ".join(doc.contacts)) + "</p>")
    if doc.notes:
        parts.append(f"<p>{e(doc.notes)}</p>")
    parts.append(f"<p>Problems: {len(doc.violations)}</p>")
    for tier in doc.tiers:
        parts.append(f"<h2>Tier {tier['tier']}</h2>")
        parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr>")
        for n, v in enumerate(tier["vms"], 1):
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _row(n, v).values()) + "</tr>")
        parts.append("</table>")
        for n, v in enumerate(tier["vms"], 1):
            parts.append(f"<h3>{n}. {e(v['vm'])}</h3><ul>")
            for label in ("contacts", "notes", "external_data", "error"):
                if v[label]:
                    text = ", ".join(v[label]) if isinstance(v[label], list) else str(v[label])
                    parts.append(f"<li>{e(label.replace('_', ' '))}: {e(text)}</li>")
            parts.append("</ul><pre>" + e("\n".join(v["commands"]) or "# no backup found") + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_xlsx(doc: PlanDocument) -> bytes:
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "DR plan"
    ws.append([f"Disaster recovery plan ({doc.generated_at})"])
    ws.append(["Contacts", ", ".join(doc.contacts)])
    ws.append(["Notes", doc.notes or ""])
    ws.append([])
    ws.append(["tier", *COLUMNS, "restore commands", "contacts", "notes"])
    for tier in doc.tiers:
        for n, v in enumerate(tier["vms"], 1):
            ws.append([tier["tier"], *_row(n, v).values(), "\n".join(v["commands"]), v["contacts"] or "",
                       v["notes"] or ""])
    bad = wb.create_sheet("Violations")
    bad.append(["vm", "host", "check", "detail"])
    for v in doc.violations:
        bad.append([v["vm"], v["host"], v["check"], v["detail"]])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def render(doc: PlanDocument, fmt: str) -> bytes:
    if fmt == "md":
        return render_markdown(doc).encode()
    if fmt == "html":
        return render_html(doc).encode()
    if fmt == "xlsx":
        return render_xlsx(doc)
    from hotvm.errors import HotvmError

    raise HotvmError(f"unknown plan format '{fmt}'", f"use one of {', '.join(FORMATS)}")
