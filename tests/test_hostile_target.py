"""A tampered, rotted, swapped or vanished repository on a target is a named error through the real CLI:
never wrong data, never silently re-created, never a downgrade of authentication (issue #13, part B)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import hotvm, hotvm_json
from qemu_helpers import DiskSpec, start_qemu
from repo_helpers import commit, restored

from hotvm.check import check_repository
from hotvm.config import Keep, TargetConfig
from hotvm.copy import copy_repository
from hotvm.errors import TamperedBlob
from hotvm.formats.bounds import chunk_max
from hotvm.formats.export import export_image
from hotvm.formats.manifest import DiskRecord, Manifest
from hotvm.formats.repository import MARKER, Repository, target_name
from hotvm.prune import prune_repository
from targets import nofollow, open_target

MiB = 1 << 20
KEY_ENV = "HOTVM_HOSTILE_TEST_KEY"


def random_raw(path: Path, size: int, data_bytes: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(os.urandom(data_bytes))
    return path


def write_config(path: Path, vms: dict[str, Path], url: str, key_env: str | None = None) -> Path:
    """hotvm.yaml with quoted VM names (they may hold ':'), one target 'nas'."""
    lines = ["hosts:", f"  - name: h-{path.parent.name}", "    vms:"]
    for name, qmp in vms.items():
        lines += [f"      - name: {json.dumps(name)}", f"        qmp: {qmp}"]
    lines += ["targets:", "  - name: nas", f"    url: {url}"]
    if key_env:
        lines.append(f"    encryption_key_env: {key_env}")
    path.write_text("\n".join(lines) + "\n")
    return path


def refused(*args: str, rc: int = 2) -> str:
    """Run the CLI, expect it to fail with one clear error (no traceback); return its stderr."""
    proc = hotvm(*args, check=False)
    assert proc.returncode == rc, (args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def complete_ids(config: Path, vm: str | None = None) -> list[str]:
    rows = hotvm_json("list", *([vm] if vm else []), "-c", str(config))
    return [r["backup_id"] for r in rows if r["complete"]]


# ----------------------------------------------------------------- problem 4: marker of an encrypted target


def test_encrypted_target_whose_marker_vanished_is_refused_and_planted_sets_never_read(
    prefect_server, qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "hostile test passphrase")
    disk = random_raw(tmp_path / "d.raw", 16 * MiB, 4 * MiB)
    vm = qemu([DiskSpec("d", disk, format="raw")])
    target, plain = tmp_path / "enc", tmp_path / "plain"
    cfg = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{target}", KEY_ENV)
    plain_cfg = write_config(tmp_path / "plain.yaml", {"web01": vm.qmp_path}, f"file://{plain}")
    real_id = hotvm_json("backup", "web01", "-c", str(cfg))["backup_id"]
    planted_id = hotvm_json("backup", "web01", "-c", str(plain_cfg))["backup_id"]

    # Someone removes the marker and plants a plaintext set (manifest + chunks) of the same VM.
    marker = (target / MARKER).read_bytes()
    (target / MARKER).unlink()
    shutil.copytree(plain / "vms" / "web01" / planted_id, target / "vms" / "web01" / planted_id)
    shutil.copytree(plain / "chunks", target / "chunks", dirs_exist_ok=True)

    for args in (["list"], ["restore", "web01", "--to", str(tmp_path / "r0")], ["backup", "web01"]):
        err = refused(*args, "-c", str(cfg))
        assert "no longer holds the hotvm repository" in err and "hotvm target forget nas" in err, err
    assert "no longer holds" in refused("check", "-c", str(cfg))
    assert not (target / MARKER).exists(), "the repository must never be re-created silently"
    assert not (tmp_path / "r0").exists() or not any((tmp_path / "r0").iterdir())

    # The marker is put back: the real set restores; the planted plaintext set is never a backup here.
    (target / MARKER).write_bytes(marker)
    assert complete_ids(cfg) == [real_id]
    err = refused("restore", "web01", "--backup", planted_id, "--to", str(tmp_path / "r1"), "-c", str(cfg))
    assert "failed authentication" in err or "not complete" in err, err
    out = tmp_path / "restored"
    hotvm("restore", "web01", "--to", str(out), "--format", "raw", "-c", str(cfg))
    assert (out / "d.raw").read_bytes() == disk.read_bytes()

    # Stripping the encryption entry (with a fresh id) is a swap this host notices, key or no key.
    meta = json.loads(marker)
    downgraded = {"format": "hotvm", "format_version": 3, "id": "f" * 32, "chunk_hash": "sha256"}
    (target / MARKER).write_text(json.dumps(downgraded))
    err = refused("list", "-c", str(cfg))
    assert "is not the one this host used there before" in err and "lost its encryption" in err, err
    (target / MARKER).write_bytes(marker)
    assert meta["encryption"]["salt"]  # the real marker, unchanged, is accepted again
    assert complete_ids(cfg) == [real_id]


# ----------------------------------------------------------------- problem 7: bit rot in a manifest


def _manifest(target: Path, vm: str, backup_id: str) -> Path:
    return target / "vms" / target_name(vm) / backup_id / "manifest.json"


@pytest.mark.timeout(240)
def test_rotted_or_absurd_manifest_fails_restore_and_check_naming_the_set(
    prefect_server, qemu, tmp_path: Path
) -> None:
    disk = random_raw(tmp_path / "d.raw", 16 * MiB, 4 * MiB)
    vm = qemu([DiskSpec("d", disk, format="raw")])
    target = tmp_path / "target"
    cfg = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{target}")
    backup_id = hotvm_json("backup", "web01", "-c", str(cfg))["backup_id"]
    path = _manifest(target, "web01", backup_id)
    original = path.read_text()

    # One flipped bit: chunk_size 4194304 -> 4194305, or one hex digit of a chunk's hash (still a valid
    # hash): refused by restore and by check --read-data, naming the set.
    assert '"chunk_size": 4194304' in original
    digest = json.loads(original)["disks"][0]["chunks"][0][1]
    flipped_digest = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    for rotted, why in ((original.replace('"chunk_size": 4194304', '"chunk_size": 4194305', 1),
                         "chunk_size 4194305 is not a power of two"),
                        (original.replace(digest, flipped_digest, 1), "checksum does not match")):
        path.write_text(rotted)
        out = tmp_path / "r1"
        err = refused("restore", "web01", "--backup", backup_id, "--to", str(out), "-c", str(cfg))
        assert f"web01/{backup_id}" in err and why in err, err
        assert not list(out.glob("*.qcow2"))
        proc = hotvm("check", "--read-data", "--json", "-c", str(cfg), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        report = json.loads(proc.stdout)
        [problem] = report["sets"][0]["problems"]
        assert report["sets"][0]["backup_id"] == backup_id and problem["kind"] == "manifest_unreadable"
        assert why in problem["detail"], problem

    # A legacy manifest (no checksums, as older hotvm wrote) whose chunk_size rotted to another power of two:
    # the chunks no longer fit the geometry, so restore and check --read-data still refuse it.
    legacy = json.loads(original)
    legacy.pop("checksum")
    legacy["format_version"] = 1
    for d in legacy["disks"]:
        d.pop("checksum")
    path.write_text(json.dumps({**legacy, "disks": [{**legacy["disks"][0], "chunk_size": 8 * MiB}]}))
    err = refused("restore", "web01", "--backup", backup_id, "--to", str(tmp_path / "r2"), "-c", str(cfg))
    assert "chunk 0 of disk 'd' holds 4194304 bytes where the disk's geometry" in err, err
    proc = hotvm("check", "--read-data", "--json", "-c", str(cfg), check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and "geometry" in [p["kind"] for p in report["sets"][0]["problems"]]
    assert "legacy set" in report["sets"][0]["warnings"][0]

    # Absurd sizes: one line each, no traceback, no hang (pytest-timeout above).
    for field, value in (("virtual_size", 2**62), ("virtual_size", -1), ("chunk_size", 2**62),
                         ("chunk_size", 0), ("chunks", [[2**40, "0" * 64]])):
        path.write_text(json.dumps({**legacy, "disks": [{**legacy["disks"][0], field: value}]}))
        err = refused("restore", "web01", "--backup", backup_id, "--to", str(tmp_path / "r3"), "-c", str(cfg))
        assert "unreadable" in err and field in err, err
        proc = hotvm("check", "--read-data", "--json", "-c", str(cfg), check=False, timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert json.loads(proc.stdout)["sets"][0]["problems"][0]["kind"] == "manifest_unreadable"

    path.write_text(original)  # the intact manifest restores the disk as backed up
    hotvm("restore", "web01", "--to", str(tmp_path / "ok"), "--format", "raw", "-c", str(cfg))
    assert (tmp_path / "ok" / "d.raw").read_bytes() == disk.read_bytes()


# ----------------------------------------------------------------- problem 6: target unmounted mid-run


def _mount_bind(src: Path, mnt: Path) -> bool:
    return subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode == 0


def test_target_unmounted_during_a_backup_fails_it_and_nothing_complete_appears(
    prefect_server, qemu, tmp_path: Path
) -> None:
    """The target is a bind mount that is `umount -l`'d while chunks are being written (as a share that
    drops away): the run fails, neither the share nor the bare mount point gets a complete set or a new
    marker, and after the share is back the rerun resumes and completes."""
    disk = random_raw(tmp_path / "data.raw", 512 * MiB, 384 * MiB)
    vm = qemu([DiskSpec("data", disk, format="raw")])
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    if not _mount_bind(share, mnt):
        pytest.skip("needs root to bind-mount a directory")
    cfg = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{mnt}")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotvm", "backup", "web01", "-c", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=os.environ.copy(),
        )
        deadline = time.monotonic() + 120
        while not ((share / "chunks").exists() and any((share / "chunks").rglob("*"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # the share drops away mid-export
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr.decode()
        assert "no longer holds the hotvm repository" in stderr.decode(), stderr.decode()
        assert "Traceback" not in stderr.decode()
        for root in (share, mnt):
            assert not list(root.rglob("manifest.json")), f"a set became complete in {root}"
        assert not (mnt / MARKER).exists(), "the bare mount point must not become a new repository"
        assert "no longer holds" in refused("list", "-c", str(cfg))

        assert _mount_bind(share, mnt)  # the share is back: the rerun resumes the set and completes it
        [unfinished] = hotvm_json("list", "-c", str(cfg))
        assert not unfinished["complete"]
        result = hotvm_json("backup", "web01", "-c", str(cfg))
        assert result["backup_id"] == unfinished["backup_id"]
        hotvm("restore", "web01", "--to", str(tmp_path / "out"), "--format", "raw", "-c", str(cfg))
        assert (tmp_path / "out" / "data.raw").read_bytes() == disk.read_bytes()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ----------------------------------------------------------------- problems 3 and 8: names and locations


def test_vms_named_x_colon_y_and_x_underscore_y_restore_their_own_disks(
    prefect_server, tmp_path: Path
) -> None:
    disks = {"x:y": random_raw(tmp_path / "colon.raw", 8 * MiB, 2 * MiB),
             "x_y": random_raw(tmp_path / "underscore.raw", 8 * MiB, 2 * MiB)}
    vms = []
    try:
        for i, disk in enumerate(disks.values()):
            (tmp_path / f"vm{i}").mkdir()
            vms.append(start_qemu(tmp_path / f"vm{i}", [DiskSpec("d", disk, format="raw")]))
        target = tmp_path / "target"
        cfg = write_config(tmp_path / "hotvm.yaml", {n: v.qmp_path for n, v in zip(disks, vms, strict=True)},
                           f"file://{target}")
        ids = {name: hotvm_json("backup", name, "-c", str(cfg))["backup_id"] for name in disks}
    finally:
        for v in vms:
            v.stop()

    def restored(name: str, *extra: str) -> bytes:
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        hotvm("restore", name, "--to", str(out), "--format", "raw", "-c", str(cfg), *extra)
        return (out / "d.raw").read_bytes()

    assert sorted(p.name for p in (target / "vms").iterdir()) == sorted(target_name(n) for n in disks)
    for name, disk in disks.items():
        assert restored(name) == disk.read_bytes()
        assert complete_ids(cfg, name) == [ids[name]]

    # Repository files are for root only: 0600 files, 0700 directories.
    for p in [target, *target.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p} is {oct(mode)}"

    # A set older hotvm wrote for x:y lies in the shared directory x_y: still x:y's, never x_y's.
    legacy = target / "vms" / "x_y" / ids["x:y"]
    shutil.move(target / "vms" / target_name("x:y") / ids["x:y"], legacy)
    assert restored("x:y") == disks["x:y"].read_bytes()
    assert restored("x_y") == disks["x_y"].read_bytes()
    assert complete_ids(cfg, "x_y") == [ids["x_y"]]
    err = refused("restore", "x_y", "--backup", ids["x:y"], "--to", str(tmp_path / "wrong"), "-c", str(cfg))
    assert "is of VM 'x:y', not 'x_y'" in err, err

    # A set copied under another id, or into another VM's directory, is not a backup of that time or VM.
    moved = "20300101T000000Z-beef"
    shutil.copytree(target / "vms" / "x_y" / ids["x_y"], target / "vms" / "x_y" / moved)
    err = refused("restore", "x_y", "--backup", moved, "--to", str(tmp_path / "w2"), "-c", str(cfg))
    assert f"says backup '{ids['x_y']}' but lies in vms/x_y/{moved}" in err, err
    assert complete_ids(cfg, "x_y") == [ids["x_y"]]
    shutil.rmtree(target / "vms" / "x_y" / moved)
    err = refused("restore", "x_y", "--backup", "../../etc", "--to", str(tmp_path / "w3"), "-c", str(cfg))
    assert "is not a backup id" in err

    # A repository swapped under the same URL is refused until the operator says it is wanted.
    meta = json.loads((target / MARKER).read_text())
    (target / MARKER).write_text(json.dumps({**meta, "id": "0" * 32}))
    err = refused("list", "-c", str(cfg))
    assert "its id changed" in err and "hotvm target forget nas" in err, err
    hotvm("target", "forget", "nas", "-c", str(cfg))
    assert sorted(complete_ids(cfg)) == sorted(ids.values())


# ----------------------------------------------------------------- blobs: bounded, never through a symlink

SMALL_CHUNK = 64 * 1024
"""A small chunk size keeps the bound (bounds.chunk_max: about 64 KiB) far below the planted blobs."""
HOST_SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- host secret that must never leave this host\n"


@dataclass
class Planted:
    repo: Repository
    root: Path
    record: DiskRecord
    manifest: Manifest
    image: bytes
    chunk: Path
    """The first chunk's file."""


def _plain_repository(tmp_path: Path, name: str = "src") -> Planted:
    """A file:// repository with one set of a 4-chunk disk (no VM: the format's own API)."""
    root = tmp_path / name
    repo = Repository(open_target(TargetConfig(name=name, url=f"file://{root}")))
    image = tmp_path / f"{name}.raw"
    image.write_bytes(os.urandom(4 * SMALL_CHUNK))
    record = export_image(repo, device="d", image=str(image), chunk_size=SMALL_CHUNK, workers=1)
    manifest = commit(repo, "web01", 1, record)
    chunk = root / repo.chunk_path(record.chunks[0][1])
    return Planted(repo, root, record, manifest, image.read_bytes(), chunk)


def _host_file(tmp_path: Path) -> Path:
    """Stands for /root/.ssh/id_ed25519 or /etc/shadow: a file of the host, outside every target."""
    secret = tmp_path / "host" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_bytes(HOST_SECRET)
    secret.chmod(0o600)
    return secret


def _holds_secret(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return [p for p in files if HOST_SECRET in p.read_bytes()]


def _every_reader_refuses(p: Planted, tmp_path: Path, why: str) -> None:
    """restore, check --read-data and copy each fail naming the chunk, the target and the fix; the copy's
    destination never gets the chunk (nor any host bytes)."""
    name = p.chunk.name
    with pytest.raises(TamperedBlob) as caught:
        restored(p.repo, p.record, tmp_path / f"out-{why[:4]}.raw")
    assert name in str(caught.value) and "target 'src'" in str(caught.value), caught.value
    assert why in str(caught.value) and "hotvm check --target src" in str(caught.value), caught.value

    report = check_repository(p.repo, read_data=True)
    [problem] = report.sets[0].problems
    assert problem.kind == "chunk_unreadable", problem
    assert why in problem.detail and name[:16] in problem.detail, problem

    dst_root = tmp_path / f"dst-{why[:4]}"
    dst = open_target(TargetConfig(name="offsite", url=f"file://{dst_root}"))
    with pytest.raises(TamperedBlob, match=why):
        copy_repository(p.repo, dst)
    assert not (dst_root / p.repo.chunk_path(name)).exists()
    assert not list(dst_root.rglob("manifest.json")), "no set may look complete on the copy"
    assert not _holds_secret(dst_root)


def test_chunks_replaced_by_symlinks_devices_or_oversize_files_are_refused_by_every_reader(
    tmp_path: Path,
) -> None:
    """A chunk made a symlink to /dev/zero (endless) or to a host file, a FIFO, a device, or a file far
    larger than any chunk of its disk: restore, check and copy refuse it by name, without reading it."""
    p = _plain_repository(tmp_path)
    original = p.chunk.read_bytes()
    secret = _host_file(tmp_path)

    for plant, why in (
        (lambda: p.chunk.symlink_to("/dev/zero"), "symbolic link"),
        (lambda: p.chunk.symlink_to(secret), "symbolic link"),
        (lambda: os.mkfifo(p.chunk), "not a regular file"),
        (lambda: os.truncate(p.chunk, 1 << 40) if p.chunk.write_bytes(b"") == 0 else None, "larger than"),
    ):
        p.chunk.unlink()
        plant()
        _every_reader_refuses(p, tmp_path, why)
    if os.geteuid() == 0:
        p.chunk.unlink()
        os.mknod(p.chunk, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's own device node
        _every_reader_refuses(p, tmp_path, "not a regular file")

    p.chunk.unlink()
    p.chunk.write_bytes(original)
    assert restored(p.repo, p.record, tmp_path / "ok.raw") == p.image


def test_an_oversize_chunk_costs_no_more_memory_than_its_bound(tmp_path: Path) -> None:
    """A real (not sparse) chunk file 64 times its bound: the read is refused having allocated next to
    nothing, through read_bytes (copy, check) and read_into (restore) alike."""
    p = _plain_repository(tmp_path)
    big = os.urandom(1 << 20)
    with open(p.chunk, "wb") as fh:
        for _ in range(4):
            fh.write(big)  # 4 MiB
    path = p.repo.chunk_path(p.chunk.name)
    tracemalloc.start()
    try:
        for read in (lambda: p.repo.target.read_bytes(path, chunk_max(SMALL_CHUNK)),
                     lambda: p.repo.get_chunk(p.chunk.name, SMALL_CHUNK, bytearray(chunk_max(SMALL_CHUNK)))):
            with pytest.raises(TamperedBlob, match="larger than"):
                read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, f"{peak} bytes allocated to refuse a 4 MiB chunk"
    _every_reader_refuses(p, tmp_path, "larger than")


def test_set_files_and_chunk_directories_behind_symlinks_never_carry_host_bytes_or_lose_host_files(
    tmp_path: Path,
) -> None:
    """A set file (a disk journal) made a symlink to a host key is never copied offsite (copies send set
    files as stored, unverified); `chunks/<xx>` made a symlink to a host directory is never read, listed
    as chunks, swept by prune (prune would delete every 'unreferenced chunk' in it), or written into."""
    p = _plain_repository(tmp_path)
    secret = _host_file(tmp_path)
    set_dir = p.root / p.repo.set_dir("web01", p.manifest.backup_id)
    (set_dir / "disks").mkdir()
    (set_dir / "disks" / "d.json").symlink_to(secret)
    dst_root = tmp_path / "dst"
    dst = open_target(TargetConfig(name="offsite", url=f"file://{dst_root}"))
    with pytest.raises(TamperedBlob, match=r"disks/d.json on target 'src' is a symbolic link"):
        copy_repository(p.repo, dst)
    assert not _holds_secret(dst_root) and not list(dst_root.rglob("manifest.json"))
    (set_dir / "disks" / "d.json").unlink()

    # chunks/<xx> -> a host directory holding old files (as /etc does).
    host_dir = secret.parent
    old = time.time() - 30 * 86400
    os.utime(secret, (old, old))
    prefix = p.chunk.parent
    shutil.move(prefix, tmp_path / "moved-prefix")
    prefix.symlink_to(host_dir, target_is_directory=True)
    with pytest.raises(TamperedBlob, match="symbolic link"):
        restored(p.repo, p.record, tmp_path / "out.raw")
    report = check_repository(p.repo, read_data=True)
    assert "chunk_missing" in [pr.kind for pr in report.sets[0].problems]
    prune_repository(p.repo, Keep(last=1), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=60))
    assert secret.read_bytes() == HOST_SECRET, "prune deleted a host file through a symlinked directory"
    with pytest.raises(TamperedBlob, match="symbolic link"):
        copy_repository(p.repo, open_target(TargetConfig(name="offsite2", url=f"file://{tmp_path}/dst2")))
    assert not _holds_secret(tmp_path / "dst2")
    image = tmp_path / "again.raw"
    image.write_bytes(p.image)  # a backup of the same disk writes that chunk again: never into the host
    with pytest.raises(TamperedBlob, match="symbolic link"):
        export_image(p.repo, device="d", image=str(image), chunk_size=SMALL_CHUNK, workers=1)
    assert [f.name for f in host_dir.iterdir()] == [secret.name]


def test_a_symlink_planted_under_the_name_of_the_next_backups_chunk_is_not_that_chunk(
    tmp_path: Path,
) -> None:
    """A link (to a host file, or dangling) where the next backup's chunk will be stored must not pass for
    that chunk (the set would be complete and unrestorable), and the backup must not write through it."""
    p = _plain_repository(tmp_path)
    secret = _host_file(tmp_path)
    data = os.urandom(4 * SMALL_CHUNK)
    ids = [p.repo.chunk_id(data[at : at + SMALL_CHUNK]) for at in (0, SMALL_CHUNK)]
    planted = [p.root / p.repo.chunk_path(digest) for digest in ids]
    for link, points_to in zip(planted, (secret, tmp_path / "nowhere"), strict=True):
        link.parent.mkdir(mode=0o700, exist_ok=True)
        link.symlink_to(points_to)
    image = tmp_path / "next.raw"
    image.write_bytes(data)
    record = export_image(p.repo, device="d", image=str(image), chunk_size=SMALL_CHUNK, workers=1)
    commit(p.repo, "web01", 2, record)
    assert restored(p.repo, record, tmp_path / "next-out.raw") == data
    assert not any(link.is_symlink() for link in planted), "the chunks are stored in place of the links"
    assert secret.read_bytes() == HOST_SECRET
    assert not (tmp_path / "nowhere").exists()


def test_kernels_without_openat2_get_the_same_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where openat2 is missing (Linux < 5.6, a seccomp filter), each component is opened O_NOFOLLOW in
    turn: backups and restores work, and a symlinked chunk or chunk directory is refused the same way."""
    monkeypatch.setattr(nofollow, "_works", False)
    p = _plain_repository(tmp_path)
    assert restored(p.repo, p.record, tmp_path / "ok.raw") == p.image
    secret = _host_file(tmp_path)
    p.chunk.rename(tmp_path / "saved")
    p.chunk.symlink_to(secret)
    with pytest.raises(TamperedBlob, match="symbolic link"):
        restored(p.repo, p.record, tmp_path / "bad.raw")
    p.chunk.unlink()
    (tmp_path / "saved").rename(p.chunk)
    prefix = p.chunk.parent
    prefix.rename(tmp_path / "prefix")
    prefix.symlink_to(tmp_path / "prefix", target_is_directory=True)
    with pytest.raises(TamperedBlob, match="symbolic link"):
        restored(p.repo, p.record, tmp_path / "bad2.raw")
