"""RPO, RTO and tiers (hotvm/plan.py): durations, the RPO the schedules give, violations checked against
real restore-test records beside real backup sets, the DR plan rendered and parsed back, the CLI and the
dr-plan flow."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from helpers import hotvm

from hotvm.config import format_duration, parse_duration
from hotvm.config_file import parse_config
from hotvm.errors import ConfigError
from hotvm.formats.export import export_image
from hotvm.formats.manifest import Manifest
from hotvm.formats.repository import Repository, new_backup_id
from hotvm.plan import (
    check_plan,
    plan_document,
    render_html,
    render_markdown,
    render_xlsx,
    schedule_rpo,
    vm_plans,
)
from hotvm.restore import record_restore_test
from hotvm.tape.copy import store_catalog
from targets import open_target

MiB = 1 << 20
H = dt.timedelta(hours=1)


# --------------------------------------------------------------------------- pure


def test_durations_parse_and_fail_clearly() -> None:
    assert parse_duration("24h") == 24 * H
    assert parse_duration("30m") == dt.timedelta(minutes=30)
    assert parse_duration("7d") == dt.timedelta(days=7)
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration(" 2W ") == dt.timedelta(days=14)
    assert format_duration(dt.timedelta(minutes=90)) == "1h30m" and format_duration(24 * H) == "1d"
    for bad in ("24x", "", "h", "24", 24, "0h", "1h 2"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad if bad != "1h 2" else "1h2")
    base = {"hosts": [{"name": "h", "vms": [{"name": "a"}]}], "targets": [{"name": "t", "url": "/t"}]}
    with pytest.raises(ConfigError, match=r"policies\.0\.rpo: .*invalid duration '24x'.*30m, 24h, 7d"):
        parse_config({**base, "policies": [{"name": "p", "rpo": "24x"}]})
    with pytest.raises(ConfigError, match=r"hosts\.0\.vms\.0\.tier: .*greater than or equal to 1"):
        parse_config({**base, "hosts": [{"name": "h", "vms": [{"name": "a", "tier": 0}]}]})
    with pytest.raises(ConfigError, match="plan.export_targets: unknown target 'nope'"):
        parse_config({**base, "plan": {"export_targets": ["nope"]}})
    config = parse_config({**base, "policies": [{"name": "p", "rpo": "24h", "rto": "30m"}]})
    assert config.policies[0].tier == 3 and config.policies[0].rto == dt.timedelta(minutes=30)
    assert config.model_dump(mode="json")["policies"][0]["rpo"] == "1d"


def test_rpo_from_the_schedules() -> None:
    assert schedule_rpo(["0 2 * * 6"]) == dt.timedelta(days=7)  # weekly image alone
    assert schedule_rpo(["0 2 * * 6", "0 1 * * *"]) == 24 * H  # + daily files
    assert schedule_rpo(["0 2 * * 6", "0 */6 * * *"]) == 6 * H
    assert schedule_rpo(["0 2 1 * *"]) == dt.timedelta(days=31)
    assert schedule_rpo([]) is None
    config = parse_config({
        "hosts": [{"name": "h", "vms": [{"name": "img"}, {"name": "both"}]}],
        "targets": [{"name": "t", "url": "/t"}],
        "policies": [{"name": "image-only", "vms": ["img"]},
                     {"name": "both", "vms": ["both"], "files": {"schedule": "0 1 * * *"}}],
    })
    plans = {p.vm: p for p in vm_plans(config)}
    assert plans["img"].schedule_rpo == dt.timedelta(days=7)
    assert plans["both"].schedule_rpo == 24 * H


def test_recovery_order_tier_then_startup_order_and_vm_overrides() -> None:
    config = parse_config({
        "hosts": [{"name": "h1", "vms": [{"name": "web"}, {"name": "app", "startup_order": 2},
                                          {"name": "db", "tier": 1, "rpo": "1h"}]},
                  {"name": "h2", "vms": [{"name": "dns", "startup_order": 1}]}],
        "targets": [{"name": "t", "url": "/t"}],
        "policies": [{"name": "p", "tier": 2, "rpo": "7d", "rto": "1h"}],
    })
    plans = vm_plans(config)
    assert [(p.vm, p.tier) for p in plans] == [("db", 1), ("dns", 2), ("app", 2), ("web", 2)]
    assert plans[0].rpo == H and plans[0].rto == H and plans[1].rpo == dt.timedelta(days=7)


# --------------------------------------------------------------------------- real sets, real records


def _set(repo: Repository, tmp: Path, vm: str, completed_at: dt.datetime) -> Manifest:
    image = tmp / f"{vm}.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "2M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", str(image)], check=True,
                   capture_output=True)
    backup_id = new_backup_id(completed_at - dt.timedelta(minutes=5))
    repo.mark_started(vm, backup_id, "h1")
    record = export_image(repo, device="data", image=str(image), fmt="raw", chunk_size=MiB,
                          frozen_at=completed_at - dt.timedelta(minutes=5))
    repo.write_disk_record(vm, backup_id, record)
    manifest = Manifest(backup_id=backup_id, vm=vm, host="h1", driver="qemu", disks=[record],
                        started_at=completed_at - dt.timedelta(minutes=5), completed_at=completed_at)
    repo.commit_manifest(manifest)
    return manifest


def _boot(seconds: float, ok: bool = True) -> dict:
    return {"boot_check": {"ok": ok, "seconds": seconds, "detail": "login: seen", "log": "", "accel": "tcg"}}


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, dict]:
    """A hotvm.yaml and a real repository: web01 tested fast, db01 tested slow, mail never tested,
    files01 wants file restores without files:, fast01 wants an RPO its schedules cannot give."""
    root = tmp_path / "target"
    data = {
        "hosts": [{"name": "hv1", "vms": [
            {"name": "web01", "contacts": "web team <web@example.org>", "notes": "needs db01 | first",
             "external_data": ["nfs://filer/web"]},
            {"name": "db01", "tier": 1, "rto": "1m", "startup_order": 1},
            {"name": "mail", "notes": "<script>alert(1)</script> & more"},
            {"name": "files01", "file_restores": True, "rto": "1h"},
            {"name": "fast01", "rpo": "12h"},
        ]}],
        "targets": [{"name": "nas", "url": f"file://{root}"},
                    {"name": "offsite", "url": f"file://{tmp_path / 'offsite'}", "default": False}],
        "policies": [
            {"name": "files", "vms": ["files01"], "image": {"target": "nas"}, "tier": 2},
            {"name": "std", "vms": ["*"], "image": {"target": "nas"}, "files": {"target": "nas"},
             "rpo": "24h", "rto": "10m", "tier": 2},
        ],
        "plan": {"contacts": ["ops on call: +1 555 0100"], "notes": "Start with tier 1.",
                 "export_targets": ["offsite"]},
    }
    path = tmp_path / "hotvm.yaml"
    path.write_text(yaml.safe_dump(data))
    config = parse_config(data, path)
    repo = Repository(open_target(config.find_target("nas")))
    repo.ensure()
    now = dt.datetime.now(dt.UTC)
    sets = {vm: _set(repo, tmp_path, vm, now - dt.timedelta(hours=2))
            for vm in ("web01", "db01", "mail", "files01", "fast01")}
    old_web = _set(repo, tmp_path, "web01", now - dt.timedelta(days=2))  # an older set, tested slow once
    record_restore_test(config, "nas", old_web, {"vm": "web01", **_boot(3000.0)})
    record_restore_test(config, "nas", sets["web01"], {"vm": "web01", **_boot(30.0)})
    record_restore_test(config, "nas", sets["db01"], {"vm": "db01", **_boot(300.0)})
    record_restore_test(config, "nas", sets["files01"], {"vm": "files01", **_boot(5.0)})
    record_restore_test(config, "nas", sets["fast01"], {"vm": "fast01", **_boot(5.0)})
    record_restore_test(config, "nas", sets["mail"], {"vm": "mail", "boot_check": None})  # checksums only
    store_catalog(repo, {
        "format": "hotvm-tape-catalog", "version": 1, "copy_id": "20260101T080000Z-abcd", "tape": "vtl",
        "target": "nas", "created": "2026-01-01T08:00:00+00:00", "expires": "2026-03-02T08:00:00+00:00",
        "media": ["HV0001L8", "HV0002L8"], "repository": {},
        "sets": [{"vm": "db01", "backup_id": sets["db01"].backup_id, "completed_at": "",
                  "parts": [{"medium": "HV0001L8", "file": 3, "offset": 0},
                            {"medium": "HV0002L8", "file": 1, "offset": 9}],
                  "size": 1, "sha256": "0", "files": 1, "chunks": 1, "disks": ["data"]}],
    })
    return path, {"config": config, "sets": sets, "root": root}


def test_violations_rpo_rto_files_and_never_tested(fleet) -> None:
    _, ctx = fleet
    found = {(v.vm, v.check): v.detail for v in check_plan(ctx["config"])}
    assert set(found) == {("db01", "rto"), ("mail", "rto"), ("files01", "files"), ("fast01", "rpo")}
    assert "last measured restore 300 s" in found[("db01", "rto")]
    assert "exceeds RTO 1m" in found[("db01", "rto")]
    assert found[("mail", "rto")].startswith("never tested")  # a checksum-only test measures no RTO
    assert "has no files:" in found[("files01", "files")]
    assert "RPO 12h not met" in found[("fast01", "rpo")] and "every 1d" in found[("fast01", "rpo")]
    # web01: its newest record (30 s) counts, not the old slow one; a failed boot is a violation
    config = ctx["config"]
    record_restore_test(config, "nas", ctx["sets"]["web01"], {"vm": "web01", **_boot(20.0, ok=False)})
    found = {(v.vm, v.check): v.detail for v in check_plan(config)}
    assert "did not come up" in found[("web01", "rto")]


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self.pre: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs) -> None:  # noqa: ANN001
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th", "pre"):
            self._in = tag
            (self.pre.append("") if tag == "pre" else self.rows[-1].append(""))

    def handle_endtag(self, tag) -> None:  # noqa: ANN001
        if tag in ("td", "th", "pre"):
            self._in = None

    def handle_data(self, data) -> None:  # noqa: ANN001
        if self._in == "pre":
            self.pre[-1] += data
        elif self._in:
            self.rows[-1][-1] += data


def test_plan_export_rendered_and_parsed_back(fleet, tmp_path: Path) -> None:
    from openpyxl import load_workbook

    _, ctx = fleet
    doc = plan_document(ctx["config"])
    sets = ctx["sets"]
    assert [t["tier"] for t in doc.tiers] == [1, 2]
    assert [v["vm"] for v in doc.tiers[1]["vms"]] == ["web01", "mail", "files01", "fast01"]

    md = render_markdown(doc)
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| #")]
    by_vm = {r[1]: r for r in rows}
    assert list(by_vm) == ["db01", "web01", "mail", "files01", "fast01"]
    assert by_vm["db01"][3:6] == ["1d", "1m", "1d"]
    assert by_vm["db01"][6].startswith(sets["db01"].backup_id) and "file://" in by_vm["db01"][6]
    assert "vtl copy 20260101T080000Z-abcd" in by_vm["db01"][7] and "HV0001L8, HV0002L8" in by_vm["db01"][7]
    assert by_vm["web01"][8].startswith("30 s") and by_vm["mail"][8] == "never tested"
    assert by_vm["web01"][9] == "ok" and "exceeds RTO" in by_vm["db01"][9]
    assert f"hotvm restore db01 --backup {sets['db01'].backup_id} --target nas --to " in md
    assert f"hotvm restore db01 --from-tape vtl --backup {sets['db01'].backup_id} --to " in md
    assert "- notes: needs db01 | first" in md and "- contacts: web team <web@example.org>" in md
    assert "Contacts: ops on call: +1 555 0100" in md and "restore separately): nfs://filer/web" in md

    page = render_html(doc)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    cells = _Cells()
    cells.feed(page)
    vms = [r[1] for r in cells.rows if r and r[0] != "#"]
    assert vms == ["db01", "web01", "mail", "files01", "fast01"]
    assert any(f"--from-tape vtl --backup {sets['db01'].backup_id}" in p for p in cells.pre)

    xlsx = tmp_path / "plan.xlsx"
    xlsx.write_bytes(render_xlsx(doc))
    wb = load_workbook(xlsx)
    table = list(wb["DR plan"].iter_rows(values_only=True))
    header = table.index(next(r for r in table if r and r[0] == "tier"))
    body = [dict(zip(table[header], r, strict=True)) for r in table[header + 1:]]
    assert [(r["tier"], r["VM"]) for r in body] == [
        (1, "db01"), (2, "web01"), (2, "mail"), (2, "files01"), (2, "fast01")]
    assert "--from-tape vtl" in body[0]["restore commands"]
    assert body[0]["measured restore"].startswith("300 s")
    violations = list(wb["Violations"].iter_rows(values_only=True))[1:]
    assert {(v[0], v[2]) for v in violations} == {("db01", "rto"), ("mail", "rto"), ("files01", "files"),
                                                  ("fast01", "rpo")}


def test_cli_check_and_export(fleet, tmp_path: Path) -> None:
    path, _ = fleet
    proc = hotvm("plan", "check", "--config", str(path), "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    assert {(v["vm"], v["check"]) for v in json.loads(proc.stdout)} == {
        ("db01", "rto"), ("mail", "rto"), ("files01", "files"), ("fast01", "rpo")}
    assert "violation(s)" in hotvm("plan", "check", "--config", str(path), check=False).stdout

    calm = tmp_path / "calm.yaml"
    calm.write_text(yaml.safe_dump({"hosts": [{"name": "h", "vms": [{"name": "x"}]}],
                                    "targets": [{"name": "t", "url": f"file://{tmp_path / 'empty'}"}]}))
    ok = hotvm("plan", "check", "--config", str(calm))
    assert "every VM meets" in ok.stdout

    md = hotvm("plan", "export", "--config", str(path)).stdout
    assert md.startswith("# Disaster recovery plan") and "## Tier 1" in md
    out = tmp_path / "p.xlsx"
    hotvm("plan", "export", "--config", str(path), "--format", "xlsx", "--output", str(out))
    assert out.read_bytes()[:2] == b"PK"
    bad = hotvm("plan", "export", "--config", str(path), "--format", "pdf", check=False)
    assert bad.returncode == 2 and "unknown plan format 'pdf'" in bad.stderr
    tty = hotvm("plan", "export", "--config", str(path), "--format", "xlsx", check=False)
    assert tty.returncode == 2 and "--output" in tty.stderr


def test_dr_plan_flow_writes_to_the_export_targets(prefect_server, fleet) -> None:
    from flows.plan import plan_check, plan_export

    path, ctx = fleet
    result = plan_export(config=str(path), formats=["md", "html", "xlsx"])
    assert list(result["written"]) == ["offsite"]  # plan.export_targets: not the protected target
    offsite = Path(ctx["config"].find_target("offsite").url.removeprefix("file://"))
    names = sorted(p.name for p in (offsite / "plan").iterdir())
    assert names[3:] == ["dr-plan-latest.html", "dr-plan-latest.md", "dr-plan-latest.xlsx"]
    assert f"dr-plan-{result['stamp']}.md" in names
    assert "## Tier 1" in (offsite / "plan" / "dr-plan-latest.md").read_text()
    assert not (ctx["root"] / "plan").exists()
    with pytest.raises(Exception, match="4 RPO/RTO violation"):
        plan_check(config=str(path))
