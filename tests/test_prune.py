"""Prune and check against a real local target holding real backup sets (qemu-img made images, exported
with the real format); the flow and the CLI against a real Prefect server."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from helpers import hotvm

from hotvm.check import check_repository
from hotvm.config import Keep, TargetConfig
from hotvm.formats.configtar import ARCHIVE_NAME, build_config_archive
from hotvm.formats.export import chunk_digest, export_image
from hotvm.formats.manifest import ConfigArchive, Manifest
from hotvm.formats.repository import Repository, new_backup_id
from hotvm.formats.restore import restore_disk
from hotvm.prune import prune_repository
from targets import open_target

MiB = 1 << 20
FUTURE = dt.datetime(2030, 1, 15, 12, 0, tzinfo=dt.UTC)  # a Tuesday; every file on the target is older


def qemu_io(image: Path, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for cmd in cmds:
        args += ["-c", cmd]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def new_image(path: Path, fmt: str, size: str = "8M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


@dataclass
class History:
    """Real sets on a real target, with a raw copy of each disk as it was when its set was taken."""

    root: Path
    repo: Repository
    tmp: Path
    copies: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)

    def backup(self, vm: str, image: Path, fmt: str, completed_at: dt.datetime, name: str) -> Manifest:
        backup_id = new_backup_id(completed_at - dt.timedelta(minutes=5))
        self.repo.mark_started(vm, backup_id, "h1")
        record = export_image(self.repo, device="data", image=str(image), fmt=fmt, chunk_size=MiB,
                              frozen_at=completed_at - dt.timedelta(minutes=5))
        self.repo.write_disk_record(vm, backup_id, record)
        data, names = build_config_archive([], {"vm": vm})
        self.repo.write_blob(vm, backup_id, ARCHIVE_NAME, data)
        manifest = Manifest(
            backup_id=backup_id, vm=vm, host="h1", driver="qemu", disks=[record],
            started_at=completed_at - dt.timedelta(minutes=5), completed_at=completed_at,
            config_archive=ConfigArchive(
                name=ARCHIVE_NAME, sha256=chunk_digest(data), size=len(data), files=names
            ),
        )
        self.repo.commit_manifest(manifest)
        copy = self.tmp / "points" / f"{name}.raw"
        copy.parent.mkdir(exist_ok=True)
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(copy)], check=True)
        self.copies[name], self.manifests[name] = copy, manifest
        return manifest

    def set_dir(self, name: str) -> Path:
        m = self.manifests[name]
        return self.root / "vms" / m.vm / m.backup_id

    def chunk(self, digest: str) -> Path:
        return self.root / "chunks" / digest[:2] / digest

    def chunk_of(self, name: str, index: int) -> str:
        return dict(self.manifests[name].disks[0].chunks)[index]

    def tree(self) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(self.root)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.root.rglob("*")}


def make_repo(tmp_path: Path) -> tuple[Path, Repository]:
    root = tmp_path / "target"
    repo = Repository(open_target(TargetConfig(name="nas", url=f"file://{root}")))
    repo.ensure()
    return root, repo


@pytest.fixture
def history(tmp_path: Path) -> History:
    """web01: five sets; chunk 0-1 the same in all (and in db01), chunk 4 new in each, chunk 5 written in
    the third set and unchanged after it. db01: one old set."""
    root, repo = make_repo(tmp_path)
    h = History(root, repo, tmp_path)
    web = new_image(tmp_path / "web01.raw", "raw")
    qemu_io(web, "raw", "write -P 0x11 0 2M")
    for i, when in enumerate(("2029-11-30T02:00", "2029-12-31T02:00", "2030-01-05T02:00",
                              "2030-01-10T02:00", "2030-01-14T02:00")):
        qemu_io(web, "raw", f"write -P {0x21 + i} 4M 1M")
        if i == 2:
            qemu_io(web, "raw", "write -P 0x55 5M 1M")
        h.backup("web01", web, "raw", dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC), f"web{i}")
    db = new_image(tmp_path / "db01.qcow2", "qcow2")
    qemu_io(db, "qcow2", "write -P 0x11 0 2M", "write -P 0x77 6M 1M")
    h.backup("db01", db, "qcow2", dt.datetime(2029, 6, 1, 3, tzinfo=dt.UTC), "db0")
    return h


def test_prune_removes_middle_sets_keeps_shared_chunks_and_restores(history: History) -> None:
    h = history
    policy = Keep(last=1, monthly=3)  # 2030-01 -> the 14th, 2029-12 -> the 31st, 2029-11 -> the 30th
    middle_only = {h.chunk_of("web2", 4), h.chunk_of("web3", 4)}
    before = h.tree()

    dry = prune_repository(h.repo, policy, dry_run=True, now=FUTURE)
    assert h.tree() == before  # nothing touched, not even a timestamp
    assert {(s.vm, s.backup_id) for s in dry.removed} == {
        ("web01", h.manifests["web2"].backup_id), ("web01", h.manifests["web3"].backup_id)
    }
    assert dry.sweep.swept and dry.sweep.chunks_removed == 2 and not any(s.removed for s in dry.sets)
    db = next(s for s in dry.sets if s.vm == "db01")
    assert db.keep  # another VM: its own count
    web4 = next(s for s in dry.sets if s.backup_id == h.manifests["web4"].backup_id)
    assert web4.reasons == ["last 1 of 1", "monthly 2030-01"]

    report = prune_repository(h.repo, policy, now=FUTURE)
    assert [s.backup_id for s in report.removed] == [s.backup_id for s in dry.removed]
    assert all(s.removed for s in report.removed) and not report.errors
    assert not h.set_dir("web2").exists() and not h.set_dir("web3").exists()
    for name in ("web0", "web1", "web4", "db0"):
        assert (h.set_dir(name) / "manifest.json").exists()
    assert report.sweep.chunks_removed == 2 and report.bytes_freed > 0
    assert not any(h.chunk(d).exists() for d in middle_only)
    assert h.chunk(h.chunk_of("web2", 5)).exists()  # first stored by a removed set, still used by web4
    assert h.chunk(h.chunk_of("web0", 0)).exists()  # shared by every set and by db01

    for name in ("web0", "web1", "web4", "db0"):
        out = h.tmp / "restored" / f"{name}.raw"
        restore_disk(h.repo, h.manifests[name].disks[0], out, "raw")
        assert out.read_bytes() == h.copies[name].read_bytes(), name
    checked = check_repository(h.repo, read_data=True)
    assert checked.ok and checked.chunks_unreferenced == 0 and checked.chunks_read == checked.chunks_present

    again = prune_repository(h.repo, policy, now=FUTURE)  # nothing left to do
    assert not again.removed and again.sweep.chunks_removed == 0


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def test_sweep_never_races_a_running_backup(tmp_path: Path) -> None:
    root, repo = make_repo(tmp_path)
    h = History(root, repo, tmp_path)
    now = dt.datetime.now(dt.UTC)
    web = new_image(tmp_path / "web01.raw", "raw")
    qemu_io(web, "raw", "write -P 0x11 0 2M")
    h.backup("web01", web, "raw", now - dt.timedelta(days=2), "done")
    orphan = chunk_digest(b"\x99" * MiB)  # left by a set deleted earlier: nothing references it
    repo.put_chunk(orphan, zstandard.ZstdCompressor().compress(b"\x99" * MiB))
    _age(h.chunk(orphan), 3 * 3600)

    # A backup whose flow run was scheduled two days ago and is being retried now (its id is old): disk
    # "a" is journaled, disk "b" is still being exported (chunks stored, no journal yet).
    running_id = new_backup_id(now - dt.timedelta(days=2))
    repo.mark_started("web01", running_id, "h1")
    qemu_io(web, "raw", "write -P 0xa1 2M 1M")
    journaled = export_image(repo, device="a", image=str(web), chunk_size=MiB)
    repo.write_disk_record("web01", running_id, journaled)
    qemu_io(web, "raw", "write -P 0xb1 3M 1M")
    unjournaled = export_image(repo, device="b", image=str(web), chunk_size=MiB).chunks
    for _, digest in unjournaled:
        _age(h.chunk(digest), 3 * 3600)  # old files: only the running set can protect them
    stale_tmp = root / "chunks" / orphan[:2] / f"{orphan}.tmp-0123456789ab"
    stale_tmp.write_bytes(b"torn")
    _age(stale_tmp, 2 * 3600)
    fresh_tmp = root / "chunks" / orphan[:2] / f"{orphan}.tmp-ba9876543210"
    fresh_tmp.write_bytes(b"in flight")

    report = prune_repository(repo, Keep(last=1))
    running = next(s for s in report.sets if s.backup_id == running_id)
    assert running.keep and "may still be running" in running.reasons[0]
    assert not report.sweep.swept and "may still be running" in report.sweep.skipped_because[0]
    assert h.chunk(orphan).exists() and all(h.chunk(d).exists() for _, d in unjournaled)
    assert report.sweep.chunks_unreferenced >= 2 and report.sweep.chunks_removed == 0
    assert report.sweep.tmp_removed == [f"chunks/{orphan[:2]}/{stale_tmp.name}"]
    assert not stale_tmp.exists() and fresh_tmp.exists()

    # The run dies; a day later its set is a leftover: removed, and then the sweep frees its chunks.
    started = root / "vms" / "web01" / running_id / "started.json"
    body = json.loads(started.read_text())
    started.write_text(json.dumps({**body, "started_at": str(now - dt.timedelta(days=2))}))
    _age(root / "vms" / "web01" / running_id, 25 * 3600)
    young = chunk_digest(b"\x98" * MiB)  # a chunk some other backup stored a moment ago
    repo.put_chunk(young, zstandard.ZstdCompressor().compress(b"\x98" * MiB))

    report = prune_repository(repo, Keep(last=1))
    leftover = next(s for s in report.sets if s.backup_id == running_id)
    assert leftover.removed and "incomplete leftover" in leftover.reasons[0]
    assert report.sweep.swept and report.sweep.chunks_too_young == 1
    kept = {d for _, d in h.manifests["done"].disks[0].chunks}
    freed = {orphan} | {d for _, d in journaled.chunks + unjournaled} - kept
    assert len(freed) == 3 and report.sweep.chunks_removed == 3  # orphan, 0xa1, 0xb1
    assert not any(h.chunk(d).exists() for d in freed) and all(h.chunk(d).exists() for d in kept)
    assert h.chunk(young).exists()
    assert (h.set_dir("done") / "manifest.json").exists()
    assert check_repository(repo, read_data=True).ok


def test_check_reports_every_problem_per_set(history: History) -> None:
    h = history
    assert check_repository(h.repo).ok
    missing = h.chunk_of("web1", 4)
    h.chunk(missing).unlink()
    recompressed = h.chunk(h.chunk_of("web3", 4))  # valid zstd, wrong content: only --read-data sees it
    recompressed.write_bytes(zstandard.ZstdCompressor().compress(b"\x42" * MiB))
    garbage = h.chunk(h.chunk_of("db0", 6))  # not zstd at all
    garbage.write_bytes(b"\x00garbage")
    (h.set_dir("web2") / "manifest.json").write_text("{ not json")

    quick = check_repository(h.repo)
    problems = {s.backup_id: [p.kind for p in s.problems] for s in quick.sets}
    assert problems[h.manifests["web1"].backup_id] == ["chunk_missing"]
    assert problems[h.manifests["web2"].backup_id] == ["manifest_unreadable"]
    assert problems[h.manifests["web3"].backup_id] == []
    assert problems[h.manifests["db0"].backup_id] == []
    assert "chunk 4 " in quick.sets[[s.backup_id for s in quick.sets].index(h.manifests["web1"].backup_id)] \
        .problems[0].detail

    deep = check_repository(h.repo, read_data=True)
    problems = {s.backup_id: [p.kind for p in s.problems] for s in deep.sets}
    assert problems[h.manifests["web3"].backup_id] == ["chunk_corrupt"]
    assert problems[h.manifests["db0"].backup_id] == ["chunk_corrupt"]
    assert problems[h.manifests["web4"].backup_id] == []
    assert deep.problem_count == 4 and not deep.ok

    # prune keeps the unreadable set and, unable to know its chunks, sweeps nothing
    report = prune_repository(h.repo, Keep(last=1), now=FUTURE)
    web2 = next(s for s in report.sets if s.backup_id == h.manifests["web2"].backup_id)
    assert web2.keep and h.set_dir("web2").exists()
    assert not report.sweep.swept and "unreadable" in report.sweep.skipped_because[0]


def test_prune_flow_and_cli(prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.prune import prune

    root, repo = make_repo(tmp_path)
    h = History(root, repo, tmp_path)
    now = dt.datetime.now(dt.UTC)
    web = new_image(tmp_path / "web01.raw", "raw")
    for i, days in enumerate((3, 2, 1)):
        qemu_io(web, "raw", f"write -P {0x31 + i} 0 1M")
        h.backup("web01", web, "raw", now - dt.timedelta(days=days), f"w{i}")
    config = tmp_path / "hotvm.yaml"
    config.write_text(f"hosts: [{{name: h1}}]\ntargets:\n  - name: nas\n    url: file://{root}\n"
                      "    keep: {last: 1}\n")

    only_prune = ArtifactFilter(key=ArtifactFilterKey(any_=["prune-nas"]))
    with get_client(sync_client=True) as client:  # other tests on this server may prune a 'nas' too
        before = len(client.read_artifacts(artifact_filter=only_prune))

    dry = json.loads(hotvm("prune", "--dry-run", "--json", "-c", str(config)).stdout)
    assert dry["removed"] == 2 and dry["dry_run"] and h.set_dir("w0").exists()
    assert dry["policy"] == Keep(last=1).model_dump()
    override = json.loads(hotvm("prune", "--dry-run", "--json", "--keep-last", "2", "-c", str(config)).stdout)
    assert override["removed"] == 1

    result = prune(config=str(config), chunk_grace_minutes=0)
    assert result["removed"] == 2 and result["sweep"]["chunks_removed"] == 2 and result["bytes_freed"] > 0
    assert not h.set_dir("w0").exists() and not h.set_dir("w1").exists() and h.set_dir("w2").exists()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=only_prune)
    assert len(artifacts) == before + 3  # two dry runs from the CLI, then this run
    latest = max(artifacts, key=lambda a: a.created)
    assert latest.type == "table"
    rows = json.loads(latest.data) if isinstance(latest.data, str) else latest.data
    assert sorted(r["decision"] for r in rows) == ["kept", "removed", "removed"]

    ok = hotvm("check", "--read-data", "--json", "-c", str(config))
    assert json.loads(ok.stdout)["ok"]
    h.chunk(h.chunk_of("w2", 0)).unlink()
    bad = hotvm("check", "--json", "-c", str(config), check=False)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["sets"][0]["problems"][0]["kind"] == "chunk_missing"


def test_prune_keeps_sets_a_tape_copy_still_reads(history: History) -> None:
    h = history
    web2 = h.manifests["web2"].backup_id
    policy = Keep(last=1, monthly=3)
    with h.repo.hold("tape copy X to 'vtl'", [("web01", web2)]):
        held = prune_repository(h.repo, policy, dry_run=True, now=FUTURE)
        kept = next(s for s in held.sets if s.backup_id == web2)
        assert kept.keep and "held: tape copy X to 'vtl'" in kept.reasons
    released = prune_repository(h.repo, policy, dry_run=True, now=FUTURE)
    assert web2 in {s.backup_id for s in released.removed}  # the hold ends with the copy
    assert not list((h.root / "holds").glob("*.json"))


def test_each_vm_is_pruned_by_its_own_policy(prefect_server, tmp_path: Path) -> None:
    """One repository, two VMs under two policies (web: keep the newest, db: keep three): the prune flow
    (the production path) keeps for each VM what its own policy says and frees only the removed sets'
    chunks."""
    from flows.prune import prune

    root, repo = make_repo(tmp_path)
    h = History(root, repo, tmp_path)
    now = dt.datetime.now(dt.UTC)
    for vm, pattern in (("web01", 0x41), ("db01", 0x51)):
        image = new_image(tmp_path / f"{vm}.raw", "raw")
        for i, days in enumerate((4, 3, 2)):
            qemu_io(image, "raw", f"write -P {pattern + i} 0 1M")
            h.backup(vm, image, "raw", now - dt.timedelta(days=days), f"{vm}-{i}")
    config = tmp_path / "hotvm.yaml"
    config.write_text(
        "hosts: [{name: h1, vms: [{name: web01}, {name: db01}]}]\n"
        f"targets: [{{name: nas, url: 'file://{root}'}}]\n"
        "policies:\n"
        "  - {name: web, vms: [web01], image: {keep: {last: 1}}}\n"
        "  - {name: db, vms: [db01], image: {keep: {last: 3}}}\n"
    )

    result = prune(config=str(config), chunk_grace_minutes=0)
    assert not result["errors"] and result["removed"] == 2
    on_target = {vm: [e.backup_id for e in repo.list_sets(vm)] for vm in ("web01", "db01")}
    assert on_target == {
        "web01": [h.manifests["web01-2"].backup_id],
        "db01": [h.manifests[f"db01-{i}"].backup_id for i in range(3)],
    }
    web_kept = next(s for s in result["sets"] if s["backup_id"] == h.manifests["web01-2"].backup_id)
    assert web_kept["reasons"] == ["last 1 of 1"]
    assert result["sweep"]["chunks_removed"] == 2  # the two removed web01 sets' own chunks
    assert not h.chunk(h.chunk_of("web01-0", 0)).exists() and h.chunk(h.chunk_of("db01-0", 0)).exists()
    assert check_repository(repo, read_data=True).ok
