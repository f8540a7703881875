"""Policies (hotvm.yaml `policies:`): pure selection and validation, the "backup all" report, and the
per-host limit honoured across two concurrent flow runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from qemu_helpers import DiskSpec, start_qemu

from hotvm.config import TABLE_7_3_IMAGE_KEEP, Keep
from hotvm.config_file import parse_config
from hotvm.errors import ConfigError
from hotvm.hypervisors.resolve import resolve_vms
from hotvm.policies import claimed_elsewhere, policy_for_vm, vms_for_policy
from hotvm.prune import policy_keeps

MiB = 1 << 20


def cfg(policies: list | None = None, targets: list | None = None, **extra: object):
    data = {
        "hosts": [
            {"name": "hv1", "vms": [{"name": "web01"}, {"name": "web02"}, {"name": "db01"}]},
            {"name": "hv2", "vms": [{"name": "web03"}, {"name": "mail"}]},
        ],
        "targets": targets or [{"name": "nas", "url": "file:///srv/nas"}, {"name": "s3", "url": "/srv/s3"}],
        **extra,
    }
    if policies is not None:
        data["policies"] = policies
    return parse_config(data)


def names(pairs) -> list[tuple[str, str]]:
    return [(h.name, v.name) for h, v, *_ in pairs]


# --------------------------------------------------------------------------- pure: selection, validation


def test_no_policies_means_one_table_7_3_policy_over_every_vm() -> None:
    config = cfg()
    [policy] = config.effective_policies()
    assert policy.name == "default" and policy.vms == ["*"]
    assert policy.image.schedule == "0 2 * * 6" and policy.image.target is None  # the default target
    assert policy.image.keep == TABLE_7_3_IMAGE_KEEP
    assert policy.files is not None and policy.files.keep == Keep(days=31)
    assert len(vms_for_policy(config, "default", resolve_vms(config))) == 5
    assert policy_for_vm(config, "mail").name == "default"


def test_globs_and_first_match_wins() -> None:
    config = cfg(
        [
            {"name": "db", "vms": ["db*"], "image": {"target": "s3", "keep": {"last": 3}}},
            {"name": "web", "vms": ["web0[12]", "web03"]},
            {"name": "rest", "vms": ["*"], "image": {"schedule": "0 3 * * 0", "target": "nas"}},
        ]
    )
    assert names(vms_for_policy(config, "db", resolve_vms(config))) == [("hv1", "db01")]
    web = [("hv1", "web01"), ("hv1", "web02"), ("hv2", "web03")]
    assert names(vms_for_policy(config, "web", resolve_vms(config))) == web
    assert names(vms_for_policy(config, "rest", resolve_vms(config))) == [("hv2", "mail")]
    assert [(v.name, owner) for _, v, owner in claimed_elsewhere(config, "rest", resolve_vms(config))] == [
        ("web01", "web"), ("web02", "web"), ("db01", "db"), ("web03", "web"),
    ]  # fmt: skip
    assert policy_for_vm(config, "db01").name == "db"
    assert policy_for_vm(cfg([{"name": "w", "vms": ["web*"]}]), "mail") is None
    with pytest.raises(ConfigError, match="unknown policy 'nope' \\(configured: db, web, rest\\)"):
        config.find_policy("nope")
    # prune: a target without its own keep: uses each VM's policy image.keep (VMs whose image goes there)
    keeps = policy_keeps(config, config.find_target("s3"))
    assert keeps == {"db01": Keep(last=3)}
    assert policy_keeps(config, config.find_target("s3"), last=2) == {}  # --keep-* flags win


def test_explicit_target_keep_wins_over_policies() -> None:
    config = cfg(
        [{"name": "p", "image": {"target": "nas", "keep": {"last": 5}}}],
        targets=[{"name": "nas", "url": "/srv/nas", "keep": {"days": 3}}],
    )
    assert policy_keeps(config, config.find_target("nas")) == {}
    single = cfg([{"name": "p", "image": {"keep": {"weekly": 2}}}], targets=[{"name": "nas", "url": "/x"}])
    assert policy_keeps(single, single.find_target("nas")) == {
        vm: Keep(weekly=2) for vm in ("web01", "web02", "db01", "web03", "mail")
    }


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ([{"name": "p", "image": {"target": "tape9"}}], "policy 'p' image.target: unknown target 'tape9'"),
        ([{"name": "p", "files": {"target": "usb"}}], "policy 'p' files.target: unknown target 'usb'"),
        ([{"name": "p", "image": {"schedule": "0 2 * *"}}], "policies.0.image.schedule: .*invalid cron"),
        ([{"name": "p", "files": {"schedule": "61 1 * * *"}}], "invalid cron schedule '61 1 \\* \\* \\*'"),
        ([{"name": "p"}, {"name": "p"}], "policy names must be unique, repeated: p"),
        ([{"name": "p", "vms": []}], "policies.0.vms"),
        ([{"name": "p", "image": {"keep": {}}}], "keep: give at least one"),
        ([{"name": "p", "tape": {"schedule": "0 8 * * 0"}}], "policies.0.tape.tape: required key is missing"),
        ([{"name": "p", "imgae": {}}], "policies.0.imgae: unknown key"),
        ([{"name": "p", "tape": {"tape": "vtl"}}], "tape.tape: unknown tape 'vtl' \\(configured: none\\)"),
    ],
)
def test_policy_errors_name_the_problem(policies: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(policies)


def test_issue_example_policy_parses() -> None:
    example = yaml.safe_load(
        """
        - name: default
          vms: ["*"]
          image: {schedule: "0 2 * * 6", target: nas, keep: {last: 1, weekly: 1}}
          files: {schedule: "0 1 * * *", target: nas, keep: {days: 31}}
          tape:  {schedule: "0 8 * * 0", tape: vtl, keep: {days: 60}}
        """
    )
    try:
        config = cfg(example, tapes=[{"name": "vtl", "url": "vtl:///srv/vtl?media=4&capacity=2GiB"}])
    except ConfigError as exc:
        if "tapes: unknown key" not in str(exc):
            raise
        config = cfg(example)  # before the tape work adds `tapes:`, tape names are not checked
    [policy] = config.effective_policies()
    assert policy.image.keep == Keep(last=1, weekly=1) and policy.tape.tape == "vtl"


# --------------------------------------------------------------------------- flows against real QEMU


def random_raw(path: Path, size: int, data_bytes: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(os.urandom(data_bytes))
    return path


def start_vms(tmp_path: Path, names_: list[str], data_mib: int = 24) -> dict:
    vms = {}
    for name in names_:
        d = tmp_path / name
        d.mkdir()
        random_raw(d / "disk.raw", 64 * MiB, data_mib * MiB)
        vms[name] = start_qemu(d, [DiskSpec("disk", d / "disk.raw", format="raw")])
    return vms


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def max_overlap(spans: list[tuple]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # an end sorts before a start
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def test_two_concurrent_runs_never_exceed_the_host_limit(prefect_server, tmp_path: Path) -> None:
    """6 VMs on one host, limit 2, two `hotvm backup --all --policy` processes (3 VMs each) at once."""
    from hotvm.config import TargetConfig
    from hotvm.formats.repository import Repository
    from targets import open_target

    six = ["a", "b", "c", "d", "e", "f"]
    vms = start_vms(tmp_path, six, data_mib=48)
    try:
        host = f"h-{tmp_path.name}"
        config = write_yaml(
            tmp_path / "hotvm.yaml",
            {
                "hosts": [
                    {
                        "name": host,
                        "max_concurrent_backups": 2,
                        "vms": [{"name": n, "qmp": str(vms[n].qmp_path)} for n in six],
                    }
                ],
                "targets": [{"name": "nas", "url": f"file://{tmp_path}/target"}],
                "policies": [{"name": "first", "vms": ["a", "b", "c"]}, {"name": "second", "vms": ["*"]}],
            },
        )
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hotvm",
                    "backup",
                    "--all",
                    "--policy",
                    p,
                    "-c",
                    str(config),
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            for p in ("first", "second")
        ]
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for vm in vms.values():
            vm.stop()
    for proc, (_, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr
    first, second = (json.loads(o) for o, _ in outs)
    assert sorted((r["vm"], r["status"]) for r in first) == [
        ("a", "success"), ("b", "success"), ("c", "success"),
    ]  # fmt: skip
    assert sorted((r["vm"], r["status"]) for r in second if r["status"] == "success") == [
        ("d", "success"), ("e", "success"), ("f", "success"),
    ]  # fmt: skip
    assert {r["vm"] for r in second if r["status"] == "skipped"} == {"a", "b", "c"}  # first match wins
    repo = Repository(open_target(TargetConfig(name="nas", url=f"file://{tmp_path}/target")))
    spans = [(e.manifest.started_at, e.manifest.completed_at) for e in repo.list_sets() if e.manifest]
    assert len(spans) == 6
    peak = max_overlap(spans)
    assert peak <= 2, f"{peak} backups of one host overlapped with max_concurrent_backups=2"


def test_backup_all_reports_success_skipped_and_failed_with_the_step(prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows._fleet import BackupsFailed
    from flows.backup_policy import backup_policy

    vms = start_vms(tmp_path, ["good", "dead", "nodisk"], data_mib=2)
    vms["dead"].stop()  # its QMP socket file stays, nothing answers on it
    try:
        host = f"h-{tmp_path.name}"
        config = write_yaml(
            tmp_path / "hotvm.yaml",
            {
                "hosts": [
                    {
                        "name": host,
                        "vms": [
                            {"name": "good", "qmp": str(vms["good"].qmp_path)},
                            {"name": "dead", "qmp": str(vms["dead"].qmp_path)},
                            {"name": "nodisk", "qmp": str(vms["nodisk"].qmp_path), "exclude_disks": ["disk"]},
                            {"name": "other", "qmp": str(vms["good"].qmp_path)},
                        ],
                    }
                ],
                "targets": [{"name": "nas", "url": f"file://{tmp_path}/target"}],
                "retries": {"retries": 0, "retry_delay_s": 0},
                "policies": [{"name": "later", "vms": ["other"]}, {"name": "all", "vms": ["*"]}],
            },
        )
        with pytest.raises(BackupsFailed) as failed:
            backup_policy(policy="all", config=str(config))
        cli = subprocess.run(
            [sys.executable, "-m", "hotvm", "backup", "--all", "--policy", "all", "--config", str(config)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
        )  # fmt: skip
    finally:
        for vm in vms.values():
            vm.stop()
    rows = {r["vm"]: r for r in failed.value.results}
    assert rows["good"]["status"] == "success" and rows["good"]["backup_id"]
    assert rows["dead"]["status"] == "failed" and rows["dead"]["step"] == "reconcile"
    assert rows["nodisk"]["status"] == "skipped" and "no disks to back up" in rows["nodisk"]["reason"]
    assert rows["other"]["status"] == "skipped" and "policy 'later'" in rows["other"]["reason"]
    assert "1 of 4 VM backups of policy all failed: dead (at reconcile)" in str(failed.value)
    assert not (tmp_path / "target" / "vms" / "nodisk").exists() or not list(
        (tmp_path / "target" / "vms" / "nodisk").glob("*/manifest.json")
    ), "a skipped VM gets no (empty) complete set"

    with get_client(sync_client=True) as client:
        key = ArtifactFilter(key=ArtifactFilterKey(any_=["backup-policy-all"]))
        artifacts = client.read_artifacts(artifact_filter=key)
    assert artifacts and artifacts[0].type == "table"
    assert cli.returncode == 1
    for word in ("good", "success", "dead", "failed", "reconcile", "nodisk", "skipped", "no disks to"):
        assert word in cli.stdout, cli.stdout + cli.stderr
    assert "dead (at reconcile)" in cli.stderr


def test_backup_host_reports_through_the_shared_runner(prefect_server, tmp_path: Path) -> None:
    """backup_host reuses the same runner and report as backup_policy."""
    from flows.backup_host import backup_host

    vms = start_vms(tmp_path, ["x", "y"], data_mib=1)
    try:
        host = f"h-{tmp_path.name}"
        config = write_yaml(
            tmp_path / "hotvm.yaml",
            {
                "hosts": [
                    {"name": host, "vms": [{"name": n, "qmp": str(v.qmp_path)} for n, v in vms.items()]}
                ],
                "targets": [{"name": "nas", "url": f"file://{tmp_path}/target"}],
            },
        )
        results = backup_host(host=host, config=str(config))
    finally:
        for vm in vms.values():
            vm.stop()
    assert sorted((r["vm"], r["status"], r["host"]) for r in results) == [
        ("x", "success", host), ("y", "success", host),
    ]  # fmt: skip


def test_prune_uses_each_vms_policy_keep_when_the_target_has_none(prefect_server, tmp_path: Path) -> None:
    import datetime as dt

    from test_prune import History, make_repo, new_image, qemu_io

    from flows.prune import prune

    root, repo = make_repo(tmp_path)
    h = History(root, repo, tmp_path)
    now = dt.datetime.now(dt.UTC)
    for vm in ("web01", "db01"):
        image = new_image(tmp_path / f"{vm}.raw", "raw")
        for i, days in enumerate((3, 2, 1)):
            qemu_io(image, "raw", f"write -P {0x31 + i} 0 1M")
            h.backup(vm, image, "raw", now - dt.timedelta(days=days), f"{vm}-{i}")
    config = write_yaml(
        tmp_path / "hotvm.yaml",
        {
            "hosts": [{"name": "h1", "vms": [{"name": "web01"}, {"name": "db01"}]}],
            "targets": [{"name": "nas", "url": f"file://{root}"}],  # no keep: of its own
            "policies": [
                {"name": "db", "vms": ["db*"], "image": {"keep": {"last": 3}}},
                {"name": "rest", "vms": ["*"], "image": {"keep": {"last": 1}}},
            ],
        },
    )
    result = prune(config=str(config), dry_run=True)
    going = sorted((s["vm"], s["backup_id"]) for s in result["sets"] if not s["keep"])
    assert going == sorted(("web01", h.manifests[f"web01-{i}"].backup_id) for i in (0, 1))
    overridden = prune(config=str(config), dry_run=True, keep_last=2)  # flags replace every policy
    assert sorted(s["vm"] for s in overridden["sets"] if not s["keep"]) == ["db01", "web01"]
