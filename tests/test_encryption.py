"""Encrypted repositories: real images exported to real targets (file://, sftp://), then read back with the
right key, a wrong key, no key, and after tampering on the target."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import uuid
from pathlib import Path

import pytest
import zstandard
from helpers import hotvm
from test_targets import make_config, ssh_server  # noqa: F401 - ssh_server is a fixture make_config uses

from hotvm.check import check_repository
from hotvm.config import Keep, TargetConfig
from hotvm.credentials import encryption_key
from hotvm.errors import BackupSetError, ChecksumMismatch, TargetConfigError
from hotvm.formats.configtar import ARCHIVE_NAME, build_config_archive
from hotvm.formats.export import chunk_digest, export_image
from hotvm.formats.manifest import ConfigArchive, Manifest
from hotvm.formats.repository import MARKER, Repository, new_backup_id
from hotvm.formats.restore import restore_config, restore_disk
from hotvm.prune import prune_repository
from targets import open_target

MiB = 1 << 20
KEY_ENV = "HOTVM_TEST_ENCRYPTION_KEY"
PASSPHRASE = "correct horse battery staple"
PATTERN = b"HOTVM-PLAINTEXT-PATTERN-0123456789"
FUTURE = dt.datetime(2030, 1, 15, 12, 0, tzinfo=dt.UTC)


def image_with_pattern(path: Path, size: int = 16 * MiB) -> Path:
    """Random (incompressible) data with PATTERN at the start of every 4 KiB in the first 3 MiB."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for block in range(3 * MiB // 4096):
            fh.seek(block * 4096)
            fh.write(PATTERN + os.urandom(4096 - len(PATTERN)))
    return path


def config(root: Path, **keys: str | None) -> TargetConfig:
    return TargetConfig(name="vault", url=f"file://{root}", **keys)


def open_repo(cfg: TargetConfig) -> Repository:
    """The repository with the key its configuration names (what open_repository resolves)."""
    return Repository(open_target(cfg), encryption_key(cfg))


def backup(repo: Repository, image: Path, vm: str = "secret-vm", host: str = "secret-host-h1",
           completed_at: dt.datetime | None = None, files: list[Path] | None = None) -> Manifest:
    """What hotvm/backup.py does for one disk, through the Repository API."""
    completed_at = completed_at or dt.datetime.now(dt.UTC)
    backup_id = new_backup_id(completed_at - dt.timedelta(minutes=5))
    repo.ensure()
    repo.mark_started(vm, backup_id, host)
    record = export_image(repo, device="d", image=str(image), fmt="raw", chunk_size=MiB)
    repo.write_disk_record(vm, backup_id, record)
    data, names = build_config_archive(files or [], {"vm": vm, "host": host})
    repo.write_blob(vm, backup_id, ARCHIVE_NAME, data)
    manifest = Manifest(
        backup_id=backup_id, vm=vm, host=host, driver="qemu", disks=[record],
        started_at=completed_at - dt.timedelta(minutes=5), completed_at=completed_at,
        config_archive=ConfigArchive(
            name=ARCHIVE_NAME, sha256=chunk_digest(data), size=len(data), files=names
        ),
    )
    repo.commit_manifest(manifest)
    return manifest


def stored_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TargetConfig:
    monkeypatch.setenv(KEY_ENV, PASSPHRASE)
    return config(tmp_path / "target", encryption_key_env=KEY_ENV)


def test_roundtrip_and_nothing_readable_on_the_target(tmp_path: Path, keyed: TargetConfig) -> None:
    image = image_with_pattern(tmp_path / "disk.raw")
    conf_file = tmp_path / "launch.sh"
    conf_file.write_text("qemu-system-x86_64 -name secret-config-line\n")
    repo = open_repo(keyed)
    manifest = backup(repo, image, files=[conf_file])

    # the same backup into an unencrypted repository: the pattern and names are readable there
    plain_root = tmp_path / "plain"
    backup(open_repo(config(plain_root)), image, files=[conf_file])
    plain = stored_files(plain_root)
    assert any(PATTERN in blob for blob in plain.values())
    assert any(b"secret-host-h1" in blob for blob in plain.values())

    root = tmp_path / "target"
    files = stored_files(root)
    marker = json.loads(files.pop(MARKER))
    assert marker["format_version"] == 4 and marker["chunk_hash"] == "keyed-blake3"
    assert marker["encryption"]["cipher"] == "aes-256-gcm" and marker["encryption"]["kdf"]["name"] == "scrypt"
    assert PASSPHRASE not in json.dumps(marker)
    for path, blob in files.items():
        for secret in (PATTERN, b"secret-host-h1", b"secret-config-line", b"launch.sh", PASSPHRASE.encode()):
            assert secret not in blob, (path, secret)
        if path.endswith(".json"):
            with pytest.raises(ValueError):
                json.loads(blob)
    # chunk names are keyed: not the plain blake3 of any chunk's content
    names = {Path(p).name for p in files if p.startswith("chunks/")}
    plain_names = {Path(p).name for p in plain if p.startswith("chunks/")}
    assert len(names) == len(plain_names) == 3 and not names & plain_names
    # directory names stay plain (a documented limit)
    assert (root / "vms" / "secret-vm" / manifest.backup_id / "manifest.json").exists()

    fresh = open_repo(keyed)  # a new process: only the target and the key
    loaded = fresh.latest("secret-vm")
    assert loaded.chunk_hash == "keyed-blake3" and loaded.disks == manifest.disks
    out = restore_disk(fresh, loaded.disks[0], tmp_path / "out" / "d.raw", "raw")
    assert Path(out.path).read_bytes() == image.read_bytes()
    restored = restore_config(fresh, loaded, tmp_path / "out")
    assert any(name.endswith("launch.sh") for name in restored)
    assert b"secret-config-line" in next((tmp_path / "out" / "config").rglob("launch.sh")).read_bytes()


def test_wrong_key_missing_key_and_no_switching(tmp_path: Path, keyed: TargetConfig,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    image = image_with_pattern(tmp_path / "disk.raw", 4 * MiB)
    backup(open_repo(keyed), image)
    root = tmp_path / "target"
    before = stored_files(root)

    monkeypatch.setenv(KEY_ENV, "not the passphrase")
    for action in (lambda r: r.latest("secret-vm"), lambda r: r.list_sets(), lambda r: r.ensure(),
                   lambda r: check_repository(r), lambda r: prune_repository(r, Keep(last=1))):
        with pytest.raises(TargetConfigError, match="wrong encryption key for target 'vault'") as err:
            action(open_repo(keyed))
        assert "not the passphrase" not in str(err.value) and PASSPHRASE not in str(err.value)
        assert f"environment variable {KEY_ENV}" in str(err.value)
    assert stored_files(root) == before  # nothing written

    unkeyed = config(root)
    for action in (lambda r: r.latest("secret-vm"), lambda r: r.ensure(), lambda r: check_repository(r)):
        with pytest.raises(TargetConfigError, match="'vault' is encrypted: set encryption_key_env/secret"):
            action(open_repo(unkeyed))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(TargetConfigError, match=f"environment variable {KEY_ENV} .*encryption key.* not set"):
        open_repo(keyed).latest("secret-vm")
    assert stored_files(root) == before

    # a key for an existing unencrypted repository: refused (also for reading: no silent downgrade)
    monkeypatch.setenv(KEY_ENV, PASSPHRASE)
    plain_root = tmp_path / "plain"
    backup(open_repo(config(plain_root)), image)
    plain_before = stored_files(plain_root)
    for action in (lambda r: r.ensure(), lambda r: r.list_sets()):
        with pytest.raises(TargetConfigError, match="holds an unencrypted hotvm repository.*new target"):
            action(open_repo(config(plain_root, encryption_key_env=KEY_ENV)))
    assert stored_files(plain_root) == plain_before
    with pytest.raises(TargetConfigError, match="sets both encryption_key_env and encryption_key_secret"):
        open_repo(config(root, encryption_key_env=KEY_ENV, encryption_key_secret="blk")).ensure()


def test_cli_says_wrong_key_and_lists_with_the_right_one(tmp_path: Path, keyed: TargetConfig,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    backup(open_repo(keyed), image_with_pattern(tmp_path / "disk.raw", 2 * MiB))
    cfg = tmp_path / "hotvm.yaml"
    cfg.write_text(f"hosts: [{{name: h1}}]\ntargets:\n  - name: vault\n    url: file://{tmp_path}/target\n"
                   f"    encryption_key_env: {KEY_ENV}\n")
    listed = json.loads(hotvm("list", "--json", "-c", str(cfg)).stdout)
    assert [r["vm"] for r in listed] == ["secret-vm"] and listed[0]["complete"]
    assert json.loads(hotvm("check", "--read-data", "--json", "-c", str(cfg)).stdout)["ok"]
    monkeypatch.setenv(KEY_ENV, "guess")
    bad = hotvm("list", "-c", str(cfg), check=False)
    assert bad.returncode != 0 and "wrong encryption key for target 'vault'" in bad.stderr + bad.stdout
    assert "guess" not in bad.stderr + bad.stdout


def test_tampering_is_detected_never_restored(tmp_path: Path, keyed: TargetConfig) -> None:
    image = image_with_pattern(tmp_path / "disk.raw", 4 * MiB)
    repo = open_repo(keyed)
    manifest = backup(repo, image)
    record = manifest.disks[0]
    root = tmp_path / "target"
    chunk0 = root / repo.chunk_path(record.chunks[0][1])
    good = chunk0.read_bytes()
    flipped = bytearray(good)
    flipped[100] ^= 0x01
    chunk0.write_bytes(bytes(flipped))
    with pytest.raises(ChecksumMismatch, match="chunk 0 of disk 'd'.*failed authentication"):
        restore_disk(repo, record, tmp_path / "r.raw", "raw")
    assert not (tmp_path / "r.raw").exists() and not (tmp_path / "r.raw.partial").exists()
    deep = check_repository(open_repo(keyed), read_data=True)
    assert [p.kind for s in deep.sets for p in s.problems] == ["chunk_corrupt"]
    assert check_repository(open_repo(keyed)).ok  # without --read-data only presence is checked

    # a valid chunk of the same repository moved under another chunk's name: its AAD gives it away
    chunk0.write_bytes((root / repo.chunk_path(record.chunks[1][1])).read_bytes())
    with pytest.raises(ChecksumMismatch, match="chunk 0 of disk 'd'"):
        restore_disk(repo, record, tmp_path / "r.raw", "raw")
    # a plain zstd chunk (as an unencrypted repository stores it): refused too
    chunk0.write_bytes(zstandard.ZstdCompressor().compress(b"\x43" * MiB))
    with pytest.raises(ChecksumMismatch, match="chunk 0 of disk 'd'"):
        restore_disk(repo, record, tmp_path / "r.raw", "raw")
    chunk0.write_bytes(good)
    assert check_repository(open_repo(keyed), read_data=True).ok

    manifest_file = root / "vms" / "secret-vm" / manifest.backup_id / "manifest.json"
    blob = bytearray(manifest_file.read_bytes())
    blob[-1] ^= 0x80
    manifest_file.write_bytes(bytes(blob))
    with pytest.raises(BackupSetError, match="manifest of .* failed authentication"):
        open_repo(keyed).load_manifest("secret-vm", manifest.backup_id)
    report = check_repository(open_repo(keyed))
    assert [p.kind for s in report.sets for p in s.problems] == ["manifest_unreadable"]
    pruned = prune_repository(open_repo(keyed), Keep(last=1), now=FUTURE)
    assert not pruned.sweep.swept and "unreadable" in pruned.sweep.skipped_because[0]  # chunks unknown: kept


def test_dedup_inside_the_encrypted_repository(tmp_path: Path, keyed: TargetConfig) -> None:
    image = image_with_pattern(tmp_path / "disk.raw", 8 * MiB)
    repo = open_repo(keyed)
    first = export_image(repo, device="d", image=str(image), chunk_size=MiB)
    assert first.bytes_new > 3 * MiB
    chunks_before = sorted((tmp_path / "target" / "chunks").rglob("*"))
    second = export_image(open_repo(keyed), device="d", image=str(image), chunk_size=MiB)
    assert second.bytes_new == 0 and second.chunks == first.chunks
    assert sorted((tmp_path / "target" / "chunks").rglob("*")) == chunks_before
    clone = tmp_path / "clone.raw"
    clone.write_bytes(image.read_bytes())
    with open(clone, "r+b") as fh:
        fh.seek(5 * MiB)
        fh.write(os.urandom(MiB))
    third = export_image(open_repo(keyed), device="d", image=str(clone), chunk_size=MiB)
    assert MiB <= third.bytes_new < MiB + 4096  # one new chunk (plus nonce and tag)


def test_prune_and_check_on_an_encrypted_repository(tmp_path: Path, keyed: TargetConfig) -> None:
    image = image_with_pattern(tmp_path / "disk.raw", 8 * MiB)
    repo = open_repo(keyed)
    sets, copies = [], []
    for i, day in enumerate((10, 11, 12, 13)):
        with open(image, "r+b") as fh:
            fh.seek(6 * MiB)
            fh.write(os.urandom(MiB))  # chunk 6 new in every set; chunks 0-2 shared by all
        sets.append(backup(repo, image, completed_at=dt.datetime(2030, 1, day, 2, tzinfo=dt.UTC)))
        copies.append(tmp_path / f"copy{i}.raw")
        copies[-1].write_bytes(image.read_bytes())
    assert check_repository(open_repo(keyed), read_data=True).ok

    report = prune_repository(open_repo(keyed), Keep(last=2), now=FUTURE)
    removed = {s.backup_id for s in report.removed}
    assert removed == {sets[0].backup_id, sets[1].backup_id} and not report.errors
    assert report.sweep.swept and report.sweep.chunks_removed == 2
    root = tmp_path / "target"
    for m in sets[:2]:
        assert not (root / repo.chunk_path(dict(m.disks[0].chunks)[6])).exists()
    assert (root / repo.chunk_path(dict(sets[0].disks[0].chunks)[0])).exists()

    checked = check_repository(open_repo(keyed), read_data=True)
    assert checked.ok and checked.chunks_unreferenced == 0 and checked.chunks_read == checked.chunks_present
    for m, copy in zip(sets[2:], copies[2:], strict=True):
        out = tmp_path / "restored" / f"{m.backup_id}.raw"
        restore_disk(open_repo(keyed), m.disks[0], out, "raw")
        assert out.read_bytes() == copy.read_bytes()


def test_random_key_in_base64_skips_the_slow_kdf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    cfg = config(tmp_path / "target", encryption_key_env=KEY_ENV)
    image = image_with_pattern(tmp_path / "disk.raw", 2 * MiB)
    manifest = backup(open_repo(cfg), image)
    marker = json.loads((tmp_path / "target" / MARKER).read_text())
    assert marker["encryption"]["kdf"] == {"name": "hkdf-sha256"}
    restore_disk(open_repo(cfg), manifest.disks[0], tmp_path / "r.raw", "raw")
    assert (tmp_path / "r.raw").read_bytes() == image.read_bytes()
    monkeypatch.setenv(KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(TargetConfigError, match="wrong encryption key"):
        open_repo(cfg).latest("secret-vm")
    monkeypatch.setenv(KEY_ENV, "a passphrase, not a key")
    with pytest.raises(TargetConfigError, match="wrong encryption key"):
        open_repo(cfg).latest("secret-vm")


def test_key_from_a_prefect_secret_block(prefect_server, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    block = f"hotvm-test-key-{uuid.uuid4().hex[:6]}"
    Secret(value=PASSPHRASE).save(block, overwrite=True)
    cfg = config(tmp_path / "target", encryption_key_secret=block)
    image = image_with_pattern(tmp_path / "disk.raw", 2 * MiB)
    manifest = backup(open_repo(cfg), image)
    restore_disk(open_repo(cfg), manifest.disks[0], tmp_path / "r.raw", "raw")
    assert (tmp_path / "r.raw").read_bytes() == image.read_bytes()
    Secret(value="other").save(block, overwrite=True)
    with pytest.raises(TargetConfigError, match=f"wrong encryption key.*Prefect Secret block '{block}'"):
        open_repo(cfg).latest("secret-vm")


def test_encrypted_repository_over_sftp(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, PASSPHRASE)
    made = make_config("sftp", request, tmp_path, encryption_key_env=KEY_ENV)
    image = image_with_pattern(tmp_path / "disk.raw", 4 * MiB)
    target = made.open()
    try:
        repo = Repository(target, encryption_key(made.config))
        manifest = backup(repo, image)
        out = restore_disk(Repository(target, encryption_key(made.config)), repo.latest("secret-vm").disks[0],
                           tmp_path / "r.raw", "raw")  # fmt: skip
        assert Path(out.path).read_bytes() == image.read_bytes()
        assert check_repository(Repository(target, encryption_key(made.config)), read_data=True).ok
        raw = target.read_bytes(f"vms/secret-vm/{manifest.backup_id}/manifest.json")
        assert b"secret-host-h1" not in raw
    finally:
        target.close()
    server_root = Path(made.config.url.split(str(made.server.port), 1)[1])
    stored = [p.read_bytes() for p in server_root.rglob("*") if p.is_file()]
    assert stored and not any(PATTERN in blob for blob in stored)
    monkeypatch.setenv(KEY_ENV, "wrong")
    again = made.open()
    try:
        with pytest.raises(TargetConfigError, match="wrong encryption key for target 'archive-ssh'"):
            Repository(again, encryption_key(made.config)).latest("secret-vm")
    finally:
        again.close()


def test_config_docs_name_the_keys() -> None:
    root = Path(__file__).resolve().parents[1]
    assert "encryption_key_env" in (root / "docs" / "config.md").read_text()
    assert "## Encryption" in (root / "docs" / "format.md").read_text()


def test_cli_hot_backup_of_a_running_vm_into_an_encrypted_target(prefect_server, qemu, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The real backup path (hotvm/backup.py, the flow, the CLI) on a running QEMU, then restore."""
    from qemu_helpers import DiskSpec

    monkeypatch.setenv(KEY_ENV, PASSPHRASE)
    disk = image_with_pattern(tmp_path / "data.raw", 16 * MiB)
    vm = qemu([DiskSpec("data", disk, format="raw")])
    cfg = tmp_path / "hotvm.yaml"
    cfg.write_text(
        f"hosts:\n  - name: h-{tmp_path.name}\n    vms:\n      - name: web01\n        qmp: {vm.qmp_path}\n"
        f"targets:\n  - name: vault\n    url: file://{tmp_path}/target\n    encryption_key_env: {KEY_ENV}\n"
    )
    first = json.loads(hotvm("backup", "web01", "--config", str(cfg), "--json").stdout)
    second = json.loads(hotvm("backup", "web01", "--config", str(cfg), "--json").stdout)
    assert second["disks"][0]["bytes_new"] == 0  # dedup across backups of the encrypted repository
    out = tmp_path / "restored"
    hotvm("restore", "web01", "--to", str(out), "--format", "raw", "--config", str(cfg))
    vm.stop()
    assert (out / "data.raw").read_bytes() == disk.read_bytes()
    files = stored_files(tmp_path / "target")
    assert not any(PATTERN in blob or b"web01" in blob for p, blob in files.items() if p != MARKER)
    assert first["backup_id"] != second["backup_id"]
    monkeypatch.delenv(KEY_ENV)
    bad = hotvm("restore", "web01", "--to", str(tmp_path / "r2"), "--config", str(cfg), check=False)
    assert bad.returncode != 0 and f"environment variable {KEY_ENV}" in bad.stderr + bad.stdout


def test_incompressible_chunks_are_sealed_like_any_other(tmp_path: Path, keyed: TargetConfig) -> None:
    """A random chunk's raw-block frame (built without zstd) is encrypted like a compressed one: nothing on
    the target is a zstd frame, and a restore through the decrypting path gives the bytes back."""
    from hotvm.formats.rawframe import MAGIC, raw_layout

    text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:200])[:MiB]
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(2 * MiB) + text)
    repo = open_repo(keyed)
    manifest = backup(repo, image)
    frames = []
    for _, digest in manifest.disks[0].chunks:
        path = repo.chunk_path(digest)
        blob = (tmp_path / "target" / path).read_bytes()
        assert not blob.startswith(MAGIC)
        frames.append(bytes(repo.open_blob(path, blob, "chunk")))
    assert [raw_layout(f[:32], len(f), MiB) is not None for f in frames] == [True, True, False]
    fresh = open_repo(keyed)
    out = restore_disk(fresh, fresh.latest("secret-vm").disks[0], tmp_path / "out" / "d.raw", "raw")
    assert Path(out.path).read_bytes() == image.read_bytes()
