"""Copies of a repository on other targets (hotvm copy) and immutable sets (S3 Object Lock), against real
servers on loopback: sets made once by real hot backups of a running QEMU, copied file -> s3, s3 -> file,
sftp -> smb; an interrupted copy (SIGKILL) resumed; restores from the copy with the primary gone; an
encrypted repository copied as stored; Object Lock enforced by moto."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fs_images import Node, PartSpec, build_disk
from helpers import PAUSEPOINT, blocked_reading, hotvm, hotvm_json
from qemu_helpers import DiskSpec, start_qemu
from servers import MotoServer, SambaServer, SshServer

from hotvm.config_file import load_config
from hotvm.copy import copy_repository
from hotvm.credentials import encryption_key
from hotvm.formats.repository import Repository
from hotvm.formats.restore import restore_disk
from targets import open_target

MiB = 1 << 20
KEY = "correct horse battery staple, copied"
BUCKET = "hotvm-copies"
LOCKED_BUCKET = "hotvm-locked"
NOTE = os.urandom(300_000)  # a file in the guest's ext4: the daily file-level set copies it
ENV = {"HOTVM_COPY_S3_KEY": "test", "HOTVM_COPY_S3_SECRET": "test", "HOTVM_COPY_KEY": KEY,
       "HOTVM_COPY_SMB_PASSWORD": ""}


@dataclass
class Servers:
    s3: MotoServer
    ssh: SshServer
    smb: SambaServer | None


@dataclass
class Primary:
    """A running VM's real backups on a local target `nas` (two sets sharing chunks) and on an encrypted
    local target `vault`; `targets` is the hotvm.yaml targets list the tests add to."""

    tmp: Path
    qmp: Path
    servers: Servers
    images: dict[str, bytes]
    """backup id -> the raw bytes of the data disk restored from the primary."""

    def config(self, name: str, *targets: dict) -> Path:
        """hotvm.yaml with nas, vault and `targets`."""
        base = [
            {"name": "nas", "url": f"file://{self.tmp}/nas", "default": True},
            {"name": "vault", "url": f"file://{self.tmp}/vault", "encryption_key_env": "HOTVM_COPY_KEY"},
        ]
        host = {"name": f"h-copy-{self.tmp.name}", "vms": [{"name": "web01", "qmp": str(self.qmp)}]}
        body = {"hosts": [host], "targets": base + list(targets)}
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(body))
        return path

    def s3(self, name: str, bucket: str = BUCKET, **extra: object) -> dict:
        return {"name": name, "url": f"s3://{bucket}/{name}-{uuid.uuid4().hex[:6]}",
                "endpoint_url": self.servers.s3.endpoint_url, "access_key_env": "HOTVM_COPY_S3_KEY",
                "secret_key_env": "HOTVM_COPY_S3_SECRET", **extra}

    def sftp(self, name: str) -> tuple[dict, Path]:
        s = self.servers.ssh
        root = s.root_dir / f"{name}-{uuid.uuid4().hex[:6]}"
        return {"name": name, "url": f"sftp://root@127.0.0.1:{s.port}{root}", "key_file": str(s.client_key),
                "known_hosts": str(s.known_hosts)}, root

    def smb(self, name: str) -> dict:
        s = self.servers.smb
        if s is None:
            pytest.skip("samba is not installed (scripts/install-system-deps.sh)")
        return {"name": name, "url": f"smb://{s.user}@127.0.0.1:{s.port}/{s.share}/{name}-{uuid.uuid4().hex[:6]}",
                "password_env": "HOTVM_COPY_SMB_PASSWORD"}


def _boto(endpoint: str):  # noqa: ANN202
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture(scope="module")
def servers(request) -> Servers:
    s3 = MotoServer(auth=False).start()
    request.addfinalizer(s3.close)
    client = _boto(s3.endpoint_url)
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket=LOCKED_BUCKET, ObjectLockEnabledForBucket=True)
    ssh = SshServer().start()
    request.addfinalizer(ssh.close)
    smb = None
    if shutil.which("smbd") and shutil.which("smbpasswd"):
        smb = SambaServer().start()
        request.addfinalizer(smb.close)
        ENV["HOTVM_COPY_SMB_PASSWORD"] = smb.password
    os.environ.update(ENV)
    return Servers(s3, ssh, smb)


def _raw_restore(repo: Repository, backup_id: str, out: Path) -> bytes:
    manifest = repo.find("web01", backup_id)
    restored = restore_disk(repo, manifest.disk("data"), out, "raw")  # verifies every chunk
    data = Path(restored.path).read_bytes()
    Path(restored.path).unlink()
    return data


@pytest.fixture(scope="module")
def primary(prefect_server, servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Primary:
    """Two hot backups of a running VM to `nas` (the second after 4 MiB changed: shared chunks), a daily
    file-level set of its ext4 disk, one image backup to the encrypted `vault`: the real backup paths,
    once for the whole module."""
    from flows.backup_vm import backup_vm
    from flows.daily_files import files_vm

    tmp = tmp_path_factory.mktemp("copy")
    os.environ["HOTVM_CATALOG_DIR"], os.environ["HOTVM_LOCK_DIR"] = str(tmp / "catalog"), str(tmp / "locks")
    image = tmp / "data.raw"
    with open(image, "wb") as fh:
        fh.write(os.urandom(24 * MiB))
        fh.truncate(32 * MiB)
    fs = build_disk(tmp / "fs.raw", [PartSpec("ext4", 12, [Node("/srv/note.bin", NOTE)])])
    vm = start_qemu(tmp, [DiskSpec("data", image, format="raw"), DiskSpec("fs", fs, format="raw")])
    p = Primary(tmp, vm.qmp_path, servers, {})
    config = str(p.config("base"))
    try:
        first = backup_vm(vm="web01", config=config)["backup_id"]
        vm.qemu_io("data", f"write -P 0x42 {8 * MiB} {4 * MiB}")
        second = backup_vm(vm="web01", config=config)["backup_id"]
        files_vm(vm="web01", config=config)
        backup_vm(vm="web01", target="vault", config=config)
    finally:
        vm.stop()
    nas = Repository(open_target(load_config(config).find_target("nas")))
    p.images = {bid: _raw_restore(nas, bid, tmp / "check.raw") for bid in (first, second)}
    return p


def _open(config: Path, name: str) -> Repository:
    cfg = load_config(config)
    return Repository(open_target(cfg.find_target(name)), encryption_key(cfg.find_target(name)))


def _restores_match(p: Primary, config: Path, target: str) -> None:
    repo = _open(config, target)
    for backup_id, data in p.images.items():
        assert _raw_restore(repo, backup_id, p.tmp / f"r-{target}.raw") == data


def _copied(report: dict) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for s in report["sets"]:
        if s["action"] == "copied":
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    return kinds


# --------------------------------------------------------------------------- replication between targets


def test_copy_file_to_s3_then_s3_to_file_restores_without_the_primary(primary: Primary) -> None:
    p = primary
    config = p.config("s3", p.s3("offsite"), {"name": "dr", "url": f"file://{p.tmp}/dr"})
    first = hotvm_json("copy", "--from", "nas", "--to", "offsite", "--config", str(config))
    assert _copied(first) == {"image": 2, "files": 1} and first["marker_created"]
    assert first["chunks_present"] == 0 and first["chunks_sent"] == first["chunks_referenced"] > 6
    again = hotvm_json("copy", "--from", "nas", "--to", "offsite", "--config", str(config))
    assert again["copied"] == 0 and again["bytes_sent"] == 0  # everything arrived: nothing sent twice
    assert {s["action"] for s in again["sets"]} == {"present"}
    listed = hotvm_json("list", "--target", "offsite", "--config", str(config))
    assert sorted(r["backup_id"] for r in listed if r["complete"]) == sorted(p.images)

    # s3 -> file, then the primary is gone: the copy of the copy restores byte for byte
    third = hotvm_json("copy", "--from", "offsite", "--to", "dr", "--config", str(config))
    assert _copied(third) == {"image": 2, "files": 1}
    assert third["chunk_bytes_sent"] == first["chunk_bytes_sent"]
    shutil.move(p.tmp / "nas", p.tmp / "nas.away")
    try:
        _restores_match(p, config, "dr")
        out = p.tmp / "cli-restore"
        hotvm("restore", "web01", "--target", "offsite", "--to", str(out), "--format", "raw",
              "--config", str(config))
        assert (out / "data.raw").read_bytes() == p.images[max(p.images)]
        files = p.tmp / "cli-files"
        hotvm("files", "restore", "web01", "/fs-p1/srv/note.bin", "--to", str(files), "--target", "dr",
              "--config", str(config))
        assert (files / "fs-p1" / "srv" / "note.bin").read_bytes() == NOTE
    finally:
        shutil.move(p.tmp / "nas.away", p.tmp / "nas")


def test_copy_sftp_to_smb_and_check_the_copy(primary: Primary) -> None:
    p = primary
    sftp, _ = p.sftp("archive")
    config = p.config("smb", sftp, p.smb("branch"))
    hotvm_json("copy", "--from", "nas", "--to", "archive", "--config", str(config))
    result = hotvm_json("copy", "--from", "archive", "--to", "branch", "--config", str(config))
    assert _copied(result) == {"image": 2, "files": 1}
    _restores_match(p, config, "branch")
    check = hotvm_json("check", "--read-data", "--target", "branch", "--config", str(config))
    assert check["ok"] and check["chunks_read"] == result["chunks_sent"]


def test_a_killed_copy_resumes_without_sending_anything_twice(primary: Primary) -> None:
    p = primary
    sftp, root = p.sftp("slow")
    config = p.config("kill", sftp, {"name": "ref", "url": f"file://{p.tmp}/ref-{uuid.uuid4().hex[:6]}"})
    total = hotvm_json("copy", "--to", "ref", "--config", str(config))["bytes_sent"]

    # The kill lands mid-copy however fast the copy is: one at a time (--workers 1) and in digest order, it
    # sends three chunks, then is held before it reads the fourth (tests/pausepoint.py).
    fourth = sorted((p.tmp / "nas" / "chunks").glob("*/*"))[3]
    fifo = p.tmp / "hold-copy"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [sys.executable, str(PAUSEPOINT), fourth.name, str(fifo),
         "copy", "--to", "slow", "--workers", "1", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
    )  # fmt: skip
    try:
        with blocked_reading(fifo, child):
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert not list(root.glob("vms/*/*/manifest.json"))  # no half-copied set looks complete
    assert not [r for r in hotvm_json("list", "--target", "slow", "--config", str(config)) if r["complete"]]
    arrived = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and ".tmp-" not in f.name)
    assert len([c for c in root.glob("chunks/*/*") if ".tmp-" not in c.name]) == 3

    rerun = hotvm_json("copy", "--to", "slow", "--config", str(config))
    assert rerun["copied"] == 3
    assert rerun["bytes_sent"] == total - arrived  # only what had not arrived
    _restores_match(p, config, "slow")


def test_encrypted_repository_is_copied_as_stored(primary: Primary) -> None:
    p = primary
    offsite = p.s3("sealed", encryption_key_env="HOTVM_COPY_KEY")
    config = p.config("enc", offsite, {"name": "other", "url": f"file://{p.tmp}/nas"})
    result = hotvm_json("copy", "--from", "vault", "--to", "sealed", "--config", str(config))
    assert result["copied"] == 1
    vault, sealed = _open(config, "vault"), _open(config, "sealed")
    manifest = vault.latest("web01")
    for _, digest in manifest.disk("data").chunks[:3]:  # byte for byte what the source stores
        path = Repository.chunk_path(digest)
        assert sealed.target.read_bytes(path) == vault.target.read_bytes(path)
    data = _raw_restore(sealed, manifest.backup_id, p.tmp / "sealed.raw")
    assert data == _raw_restore(vault, manifest.backup_id, p.tmp / "vault.raw")
    assert hashlib.sha256(data).digest()

    # a destination configured without the key could not read the copy: refused before anything is written
    keyless = p.s3("keyless")
    config = p.config("enc2", offsite, {"name": "other", "url": f"file://{p.tmp}/nas"}, keyless)
    refused = hotvm("copy", "--from", "vault", "--to", "keyless", "--config", str(config), check=False)
    assert refused.returncode == 2 and "target 'keyless' could not read a copy of 'vault'" in refused.stderr
    assert "set encryption_key_env" in refused.stderr
    assert not _open(config, "keyless").target.listdir("")

    # another repository on the destination (the plain `nas`) is refused, naming both targets
    refused = hotvm("copy", "--from", "vault", "--to", "other", "--config", str(config), check=False)
    assert refused.returncode == 2
    assert "target 'other' holds another hotvm repository than target 'vault'" in refused.stderr


def test_destination_keep_is_applied_before_copying(primary: Primary, tmp_path: Path) -> None:
    p = primary
    config = p.config("keep", {"name": "lean", "url": f"file://{tmp_path}/lean", "keep": {"last": 1}})
    cfg = load_config(config)
    report = copy_repository(_open(config, "nas"), open_target(cfg.find_target("lean")),
                             keep=cfg.find_target("lean").keep)
    actions = {s.backup_id: s.action for s in report.sets if s.kind == "image"}
    assert actions == {min(p.images): "skipped", max(p.images): "copied"}


# --------------------------------------------------------------------------- immutable sets (S3 Object Lock)


def test_immutable_days_needs_a_bucket_with_object_lock(primary: Primary) -> None:
    p = primary
    config = p.config("nolock", p.s3("plain", immutable_days=1))
    refused = hotvm("copy", "--to", "plain", "--config", str(config), check=False)
    assert refused.returncode == 2
    assert f"bucket '{BUCKET}'" in refused.stderr and "does not have Object Lock enabled" in refused.stderr


def test_locked_sets_survive_deletes_and_prune_until_they_expire(primary: Primary) -> None:
    from botocore.exceptions import ClientError

    from hotvm.check import check_repository
    from hotvm.config import Keep
    from hotvm.errors import TargetError
    from hotvm.prune import prune_repository

    p = primary
    lock_s = 20
    config = p.config("lock", p.s3("locked", bucket=LOCKED_BUCKET, immutable_days=lock_s / 86400,
                                   object_lock_mode="COMPLIANCE"))
    before = time.time()
    report = hotvm_json("copy", "--to", "locked", "--config", str(config))
    assert report["copied"] == 3 and report["immutable_until"]
    repo = _open(config, "locked")
    sets = {c.backup_id: c for c in check_repository(repo).sets}
    for check in sets.values():
        assert before + lock_s <= check.retained_until.timestamp() <= time.time() + lock_s + 1
    old = min(p.images)
    old_dir = Repository.set_dir("web01", old)

    # anyone with the same credentials: deleting the stored versions is refused by the server
    s3 = _boto(p.servers.s3.endpoint_url)
    key = f"{repo.target.root.partition('/')[2]}/{old_dir}/manifest.json"
    version = s3.list_object_versions(Bucket=LOCKED_BUCKET, Prefix=key)["Versions"][0]["VersionId"]
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=LOCKED_BUCKET, Key=key, VersionId=version)
    with pytest.raises(TargetError, match="Object Lock"):
        repo.target.delete_tree(old_dir)
    assert repo.load_manifest("web01", old)  # still there, still complete

    # hotvm's own prune plans no deletion of a locked set, and says why
    pruned = prune_repository(repo, Keep(last=1), chunk_grace=dt.timedelta(0))
    outcome = {s.backup_id: s for s in pruned.sets}[old]
    assert outcome.keep and not outcome.removed and "immutable until" in " ".join(outcome.reasons)

    # a chunk a new set reuses gets its lock extended (never shortened) before that set's manifest
    from hotvm.immutability import protect_chunks

    shared = Repository.chunk_path(repo.find("web01", max(p.images)).disk("data").chunks[0][1])
    until = repo.target.retained_until(shared)
    time.sleep(1.5)
    assert protect_chunks(repo.target, [shared]) == 1 and repo.target.retained_until(shared) > until

    # after expiry, prune removes it (and the server lets it)
    time.sleep(max(0.0, sets[old].retained_until.timestamp() - time.time()) + 1.5)
    pruned = prune_repository(repo, Keep(last=1), chunk_grace=dt.timedelta(0))
    assert {s.backup_id for s in pruned.sets if s.removed} == {old}
    assert [e.backup_id for e in repo.list_sets("web01")] == [max(p.images)]
    assert not s3.list_object_versions(Bucket=LOCKED_BUCKET, Prefix=key).get("Versions")
    _restores_match_one(repo, max(p.images), p)


def _restores_match_one(repo: Repository, backup_id: str, p: Primary) -> None:
    assert _raw_restore(repo, backup_id, p.tmp / "one.raw") == p.images[backup_id]


def test_offsite_copy_flow_copies_and_reports(primary: Primary, tmp_path: Path) -> None:
    from flows.offsite_copy import offsite_copy

    config = primary.config("flow", {"name": "offsite", "url": f"file://{tmp_path}/offsite"})
    result = offsite_copy(destination="offsite", config=str(config))
    assert result["copied"] == 3 and result["source"] == "nas"
    assert offsite_copy(destination="offsite", config=str(config))["bytes_sent"] == 0


# ------------------------------------------------------------------ zero errors: verify the copy, plan


def test_plan_lists_copies_and_checks_offsite_and_immutable(primary: Primary, tmp_path: Path) -> None:
    p = primary
    config = p.config("plan", {"name": "offsite", "url": f"file://{tmp_path}/offsite"})
    body = json.loads(config.read_text())
    body["targets"] = [t for t in body["targets"] if t["name"] != "vault"]  # vault holds a set too
    body["policies"] = [{"name": "dr", "vms": ["*"], "rpo": "7d",
                         "copies": {"offsite": True, "immutable": True}}]
    config.write_text(json.dumps(body))
    missing = {(v["check"], v["detail"]) for v in json.loads(hotvm(
        "plan", "check", "--json", "--config", str(config), check=False).stdout)}
    assert ("copies", "no offsite copy of web01 (policy dr requires one: hotvm copy --to TARGET)") in missing
    assert any(c == "copies" and "no immutable copy" in d for c, d in missing)

    hotvm_json("copy", "--to", "offsite", "--config", str(config))
    verified = hotvm_json("verify", "web01", "--target", "offsite", "--config", str(config))
    assert [r["verified"] for r in verified] == [True]  # restore test of the copy, recorded on the copy
    scrub = hotvm_json("check", "--read-data", "--target", "offsite", "--config", str(config))
    assert scrub["ok"]
    after = [v["detail"] for v in json.loads(hotvm(
        "plan", "check", "--json", "--config", str(config), check=False).stdout) if v["check"] == "copies"]
    assert len(after) == 1 and "no immutable copy" in after[0]

    md = hotvm("plan", "export", "--format", "md", "--config", str(config)).stdout
    newest = max(p.images)
    assert f"nas (primary): {newest}, not verified" in md
    assert f"offsite (copy): {newest}, verified" in md
