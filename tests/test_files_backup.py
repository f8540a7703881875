"""Daily file-level backups of a running QEMU VM: real ext4 / vfat / ntfs partitions built with mkfs, read
from the frozen base through the daily-files flow; then find / ls / restore (CLI), hybrid restore, prune."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fs_images import Node, PartSpec, build_disk, populate, to_qcow2
from helpers import PAUSEPOINT, blocked_reading, hotvm, hotvm_json, write_config
from qemu_helpers import DiskSpec, overlay_files, qemu_img

from hotvm.hypervisors.base import OVERLAY_MARKER

MiB = 1 << 20
T0 = 1_700_000_000  # even seconds: FAT keeps mtimes to 2 s
T1 = 1_710_000_000
BIG = os.urandom(5 * MiB + 123)
OLD = os.urandom(MiB + 7)  # a chunk of its own: pruned with the last set that has the file

EXT4 = [
    Node("/docs", mode=0o750, uid=1000, gid=100, mtime=T0),
    Node("/docs/report.txt", b"quarterly report\n" * 50, mode=0o640, uid=1000, gid=100, mtime=T0),
    Node("/docs/sales2026.xls", b"sales figures " * 300, mode=0o600, uid=1001, gid=101, mtime=T0 + 2),
    Node("/docs/old.txt", OLD, mtime=T0),
    Node("/docs/name.txt", b"renamed later" * 10, mtime=T0),
    Node("/big.bin", BIG, mode=0o644, mtime=T0),
    Node("/link", symlink="docs/report.txt"),
    Node("/docs/hard", hardlink_to="/docs/report.txt"),
]
VFAT = [Node("/SALES.XLS", b"fat sales " * 100, mtime=T0), Node("/DIR/NOTE.TXT", b"note", mtime=T0)]
NTFS = [Node("/win/readme.txt", b"ntfs file " * 20, mtime=T0)]
PARTS = [PartSpec("ext4", 24, EXT4), PartSpec("vfat", 16, VFAT), PartSpec("ntfs", 16, NTFS)]

# Between the two backups: 2 changed, 2 added, 1 deleted, 1 renamed (content the store already has)
CHANGED_EXT4 = [
    Node("/docs/report.txt", b"quarterly report v2\n" * 50, mode=0o640, uid=1000, gid=100, mtime=T1),
    Node("/docs/new.txt", b"brand new file", mode=0o604, uid=7, gid=8, mtime=T1),
]
CHANGED_VFAT = [Node("/SALES.XLS", b"fat sales v2 " * 100, mtime=T1)]
CHANGED_NTFS = [Node("/win/added.txt", b"added on ntfs", mtime=T1)]


def on_overlay(vm) -> bool:  # noqa: ANN001 - RunningQemu
    """The guest writes to a hotvm overlay now (asked on the test's own QMP socket)."""
    return any(OVERLAY_MARKER in str(b.get("inserted", {}).get("file", "")) for b in vm.qmp("query-block"))


@pytest.fixture
def files_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOTVM_CATALOG_DIR", str(tmp_path / "catalog"))
    monkeypatch.setenv("HOTVM_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path


def build_vm_disks(tmp_path: Path) -> tuple[Path, Path]:
    raw = build_disk(tmp_path / "vda.raw", PARTS, table="gpt")
    qcow = to_qcow2(raw, tmp_path / "vda.qcow2")
    raw.unlink()
    second = build_disk(
        tmp_path / "vdb.raw", [PartSpec("garbage", 4), PartSpec("ext4", 12, [Node("/b.txt", b"disk b")])]
    )
    return qcow, second


def change_files(qcow: Path, tmp_path: Path) -> None:
    """What the guest did between two daily backups (applied to the stopped VM's disk)."""
    raw = tmp_path / "vda-edit.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(qcow), str(raw))
    populate(
        raw, 0, "ext4", CHANGED_EXT4, remove=["/docs/old.txt"], rename={"/docs/name.txt": "/docs/moved.txt"}
    )
    populate(raw, 1, "vfat", CHANGED_VFAT)
    populate(raw, 2, "ntfs", CHANGED_NTFS)
    qcow.unlink()
    to_qcow2(raw, qcow)
    raw.unlink()


def by_volume(result: dict) -> dict[str, dict]:
    return {r["volume"]: r for r in result["volumes"]}


def assert_restored(root: Path, nodes: list[Node], owners: bool = True) -> None:
    for n in nodes:
        if n.data is None or n.hardlink_to or n.symlink:
            continue
        path = root / n.path.lstrip("/")
        assert path.read_bytes() == n.data, n.path
        st = path.stat()
        if n.mtime is not None:
            assert st.st_mtime_ns == int(n.mtime) * 10**9, n.path
        if owners:
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (n.mode, n.uid, n.gid), n.path


def test_daily_files_backup_find_ls_restore_hybrid_prune(prefect_server, qemu, files_env: Path) -> None:
    from flows.backup_vm import backup_vm
    from flows.daily_files import files_vm

    tmp_path = files_env
    vda, vdb = build_vm_disks(tmp_path)
    disks = [DiskSpec("vda", vda), DiskSpec("vdb", vdb, format="raw")]
    vm = qemu(disks)
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")

    image = backup_vm(vm="web01", config=str(config))  # the weekly image, for the hybrid restore
    first = files_vm(vm="web01", config=str(config))
    vols = by_volume(first)
    assert {k: v["status"] for k, v in vols.items()} == {
        "vda-p1": "ok", "vda-p2": "ok", "vda-p3": "ok", "vdb-p1": "skipped", "vdb-p2": "ok",
    }  # fmt: skip
    assert "no readable file system" in vols["vdb-p1"]["reason"]
    assert (vols["vda-p1"]["fstype"], vols["vda-p2"]["fstype"], vols["vda-p3"]["fstype"]) == (
        "ext4",
        "vfat",
        "ntfs",
    )
    assert vols["vda-p1"]["files_seen"] == 6  # report, sales, old, name, big and the hard link
    assert vols["vda-p1"]["files_stored"] == 5  # the hard link and its target share one content
    assert first["incremental_from"] is None
    assert [s["name"] for s in first["steps"] if s["device"] == "vda"] == [
        "scan_files", "add_redo", "commit_level1", "commit_final",
    ]  # fmt: skip
    assert overlay_files(tmp_path) == []

    vm.stop()
    change_files(vda, tmp_path)
    vm = qemu(disks)
    second = hotvm_json("files", "backup", "web01", "-c", str(config))  # the same flow, from the CLI
    vols2 = by_volume(second)
    assert second["incremental_from"] == first["backup_id"]
    # only the changed, added and renamed files are read; the renamed one is not stored again
    assert (vols2["vda-p1"]["files_read"], vols2["vda-p1"]["files_stored"]) == (3, 2)
    assert vols2["vda-p1"]["bytes_new"] == len(CHANGED_EXT4[0].data) + len(CHANGED_EXT4[1].data)
    assert vols2["vda-p1"]["bytes_unchanged"] >= len(BIG)
    assert (vols2["vda-p2"]["files_read"], vols2["vda-p2"]["files_stored"]) == (1, 1)
    assert (vols2["vda-p3"]["files_read"], vols2["vda-p3"]["files_stored"]) == (1, 1)
    assert vols2["vdb-p2"]["files_read"] == 0
    assert overlay_files(tmp_path) == []

    # ---- find / ls / restore through the CLI, each backup exactly as it was
    found = hotvm_json("files", "find", "web01", "sales*.xls", "-c", str(config))
    sales = "/vda-p1/docs/sales2026.xls"
    assert {(r["path"], r["backup_id"]) for r in found} == {
        (sales, first["backup_id"]),
        (sales, second["backup_id"]),
    }
    fat = hotvm_json("files", "find", "web01", "SALES.*", "-c", str(config))
    assert sorted(r["size"] for r in fat) == sorted([len(VFAT[0].data), len(CHANGED_VFAT[0].data)])
    at_first = hotvm_json(
        "files", "find", "web01", "*.txt", "--at", first_completed(first, config), "-c", str(config)
    )
    assert {r["backup_id"] for r in at_first} == {first["backup_id"]}

    listing = hotvm_json(
        "files", "ls", "web01", "/vda-p1/docs", "--backup", first["backup_id"], "-c", str(config)
    )
    assert {r["name"] for r in listing} == {"report.txt", "sales2026.xls", "old.txt", "name.txt", "hard"}
    listing2 = hotvm_json("files", "ls", "web01", "/vda-p1/docs", "-c", str(config))
    assert {r["name"] for r in listing2} == {"report.txt", "sales2026.xls", "new.txt", "moved.txt", "hard"}
    volumes = hotvm_json("files", "ls", "web01", "-c", str(config))
    assert {r["name"] for r in volumes} == {"vda-p1", "vda-p2", "vda-p3", "vdb-p2"}

    out1 = tmp_path / "out1"
    hotvm("files", "restore", "web01", "/vda-p1", "/vda-p2", "/vda-p3", "--to", str(out1),
          "--backup", first["backup_id"], "-c", str(config))  # fmt: skip
    assert_restored(out1 / "vda-p1", EXT4)
    assert (out1 / "vda-p1" / "big.bin").read_bytes() == BIG
    assert os.readlink(out1 / "vda-p1" / "link") == "docs/report.txt"
    assert (
        os.stat(out1 / "vda-p1" / "docs" / "hard").st_ino
        == os.stat(out1 / "vda-p1" / "docs" / "report.txt").st_ino
    )
    assert (out1 / "vda-p1" / "docs").stat().st_mode & 0o7777 == 0o750
    assert_restored(out1 / "vda-p2", VFAT, owners=False)
    assert_restored(out1 / "vda-p3", NTFS, owners=False)

    out2 = tmp_path / "out2"
    hotvm("files", "restore", "web01", "/vda-p1/docs", "--to", str(out2), "-c", str(config))
    assert_restored(out2 / "vda-p1", CHANGED_EXT4)
    assert not (out2 / "vda-p1" / "docs" / "old.txt").exists()
    assert (out2 / "vda-p1" / "docs" / "moved.txt").read_bytes() == b"renamed later" * 10
    refused = hotvm(
        "files", "restore", "web01", "/vda-p1/docs", "--to", str(out2), "-c", str(config), check=False
    )
    assert refused.returncode == 2 and "already exist" in refused.stderr

    # ---- the weekly image set browsed and restored from with the same commands (read through its chunks)
    image_ls = hotvm_json(
        "files", "ls", "web01", "/vda-p1/docs", "--backup", image["backup_id"], "-c", str(config)
    )
    assert {r["name"] for r in image_ls} == {r["name"] for r in listing}
    out3 = tmp_path / "out3"
    hotvm("files", "restore", "web01", "/vda-p1/docs/sales2026.xls", "--backup", image["backup_id"],
          "--to", str(out3), "-c", str(config))  # fmt: skip
    assert_restored(out3 / "vda-p1", [n for n in EXT4 if n.path == "/docs/sales2026.xls"])
    rebuilt = hotvm_json("files", "catalog", "--rebuild", "-c", str(config))
    assert rebuilt["rebuilt"] and rebuilt["sets"] == 2  # from the file sets alone; image sets on demand

    # ---- hybrid restore: the older image, brought up to the newest file set
    hybrid = hotvm_json("restore", "web01", "--hybrid", "--to", str(tmp_path / "dr"), "-c", str(config))
    assert hybrid["backup_id"] == image["backup_id"] and hybrid["files_backup_id"] == second["backup_id"]
    assert_tree(Path(hybrid["disks"][0]["path"]) if hybrid["disks"][0]["device"] == "vda" else
                Path(hybrid["disks"][1]["path"]))  # fmt: skip

    # ---- prune: file contents stay while a file set references them
    check_prune(config, first, second)


def first_completed(result: dict, config: Path) -> str:
    from hotvm.files.filesets import FileSets
    from hotvm.formats.opener import open_repository

    with open_repository(config) as repo:
        manifest = FileSets(repo).load_manifest("web01", result["backup_id"])
    return manifest.completed_at.isoformat()


def assert_tree(raw: Path) -> None:
    """Read the hybrid-restored disk back with the read side: the newest daily's files, none deleted ones."""
    from hotvm.files.blockdev import open_image
    from hotvm.files.fs import open_filesystem
    from hotvm.files.volumes import find_volumes

    with open_image(raw, "raw") as source:
        volumes = {v.name: v for v in find_volumes(source, "vda")}
        with open_filesystem(source, volumes["p1"]) as fs:
            files = {e.path: e for e in fs.walk()}
            assert "/docs/old.txt" not in files and "/docs/name.txt" not in files
            assert b"".join(fs.read(files["/docs/moved.txt"])) == b"renamed later" * 10
            assert b"".join(fs.read(files["/docs/report.txt"])) == CHANGED_EXT4[0].data
            assert files["/docs/new.txt"].mode == 0o604 and files["/docs/new.txt"].uid == 7
            assert files["/docs/new.txt"].mtime_ns == T1 * 10**9
            assert b"".join(fs.read(files["/big.bin"])) == BIG
        with open_filesystem(source, volumes["p2"]) as fs:
            files = {e.path: e for e in fs.walk()}
            assert b"".join(fs.read(files["/SALES.XLS"])) == CHANGED_VFAT[0].data
        with open_filesystem(source, volumes["p3"]) as fs:
            files = {e.path: e for e in fs.walk()}
            assert b"".join(fs.read(files["/win/added.txt"])) == b"added on ntfs"


def check_prune(config: Path, first: dict, second: dict) -> None:
    from hotvm.formats.opener import open_repository

    with open_repository(config) as repo:
        _check_prune(repo, config, first, second)


def _check_prune(repo, config: Path, first: dict, second: dict) -> None:  # noqa: ANN001
    from hotvm import prune
    from hotvm.check import check_repository
    from hotvm.config import Keep
    from hotvm.files.browse import open_view, resolve_set
    from hotvm.files.restore import restore_entries

    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    report = prune.prune_repository(repo, Keep(last=1), now=now, chunk_grace=dt.timedelta(0))
    assert report.sweep.swept and all(s.keep for s in report.sweep.file_sets)
    for backup_id in (first["backup_id"], second["backup_id"]):  # every file content is still there
        with open_view(repo, resolve_set(repo, "web01", backup_id)) as view:
            files = [e for e in view.entries if e["kind"] == "file"]
            for e in files:
                assert len(b"".join(view.read(e))) == e["size"]
    # a files policy of "last 1": the first file set goes, its own contents are swept, the second restores
    policy = prune.PrunePolicy(Keep(last=1), files=Keep(last=1))
    sweep = prune.prune_repository(repo, policy, now=now, chunk_grace=dt.timedelta(0)).sweep
    removed = [s.backup_id for s in sweep.file_sets if s.removed]
    assert removed == [first["backup_id"]] and sweep.chunks_removed == 1  # old.txt's chunk
    with open_view(repo, resolve_set(repo, "web01", None)) as view:
        out = Path(str(config)).parent / "after-prune"
        restore_entries(view.entries, view.read, out)
    assert (out / "vda-p1" / "big.bin").read_bytes() == BIG
    assert (out / "vda-p1" / "docs" / "report.txt").read_bytes() == CHANGED_EXT4[0].data
    checked = check_repository(repo, read_data=True)  # hotvm check sees (and reads) the file sets too
    assert checked.ok, checked.summary()
    assert [s.kind for s in checked.sets].count("files") == 1 and checked.chunks_unreferenced == 0


def test_failed_and_killed_file_backups_roll_back_and_resume(
    prefect_server, qemu, files_env: Path, small_tmpfs: Path
) -> None:
    """The target fills up in the middle of a disk: no overlay is left, and the rerun (same backup id) skips
    the volumes the first attempt journaled, then completes. Then the daily flow skips an unchanged volume
    (dirty bitmap), and a SIGKILLed run is reconciled and resumed by the next one."""
    from flows.daily_files import files_vm
    from hotvm.backup import open_session

    tmp_path = files_env
    big = os.urandom(6 * MiB)
    raw = build_disk(tmp_path / "vda.raw", [
        PartSpec("ext4", 12, [Node("/small.txt", b"small", mtime=T0)]),
        PartSpec("ntfs", 16, [Node("/big.bin", big, mtime=T0)]),
    ])  # fmt: skip
    vm = qemu([DiskSpec("vda", raw, format="raw")])
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{small_tmpfs}/repo")
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (8 * MiB))
    backup_id = "20261127T010000Z-rerun"

    state = files_vm(vm="web01", config=str(config), backup_id=backup_id, return_state=True)
    assert state.is_failed()
    with open_session("web01", config).driver() as driver:
        assert all(not d.hotvm_overlays for d in driver.list_disks()), "rolled back: no VM left on an overlay"
    assert overlay_files(tmp_path) == []
    journal = small_tmpfs / "repo" / "files" / "web01" / backup_id / "volumes" / "vda-p1.json"
    assert journal.exists() and not (journal.parent / "vda-p2.json").exists()
    stamp = journal.stat().st_mtime_ns

    filler.unlink()
    result = files_vm(vm="web01", config=str(config), backup_id=backup_id)
    assert result["backup_id"] == backup_id
    assert journal.stat().st_mtime_ns == stamp  # p1 came from the first attempt, not read again
    vols = by_volume(result)
    p2 = vols["vda-p2"]  # chunks stored before the target filled up (if any) are not stored again
    assert p2["bytes_new"] + p2["bytes_unchanged"] == len(big) and p2["files_read"] == 1
    assert overlay_files(tmp_path) == []
    out = tmp_path / "out"
    hotvm(
        "files",
        "restore",
        "web01",
        "/vda-p2/big.bin",
        "/vda-p1/small.txt",
        "--to",
        str(out),
        "-c",
        str(config),
    )
    assert (out / "vda-p2" / "big.bin").read_bytes() == big
    assert (out / "vda-p1" / "small.txt").read_bytes() == b"small"

    # the daily-files deployment's flow: every VM of the policy (Table 7.3 default policy has files:)
    from flows.daily_files import daily_files

    vm.qemu_io("vda", f"write -z {12 * MiB} 64k")  # a guest write into p1's last (free) blocks
    [row] = daily_files(policy="default", config=str(config))
    assert row["status"] == "success" and row["incremental_from"] == backup_id
    assert row["files_read"] == 0 and row["files_seen"] == 2
    # the dirty bitmap started when the resumed set froze the disk: p1 was written to (walked, nothing
    # changed in its files), no block of p2 changed (not walked at all)
    assert [v["unchanged_volume"] for v in row["volumes"]] == [False, True]

    # SIGKILL in the middle (no hook runs): the VM stays on its overlay until the rerun reconciles it. The
    # killed run is held where the kill must land (tests/pausepoint.py): before it reads the previous set's
    # entry list of vda-p1 (its first read on the frozen disk, overlay on, manifest not written). Unheld, this
    # small unchanged VM is on its overlay for about a second (0.7-1.8 s measured under load): a poll late by
    # that much misses it, and a kill that lands after the final commit or the manifest leaves nothing to
    # reconcile or resume.
    fifo = tmp_path / "hold-files-backup"
    os.mkfifo(fifo)
    killed = subprocess.Popen(
        [sys.executable, str(PAUSEPOINT), "vda-p1.entries.zst", str(fifo),
         "files", "backup", "web01", "--new", "-c", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        with blocked_reading(fifo, killed):
            assert on_overlay(vm), "the backup reads the frozen disk with its overlay on"
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
    from hotvm.files.filesets import FileSets
    from hotvm.formats.opener import open_repository

    with open_repository(config) as repo:
        unfinished = FileSets(repo).list_sets("web01")[-1]
    assert not unfinished.complete
    resumed = hotvm_json("files", "backup", "web01", "-c", str(config))  # resumes the killed set
    assert resumed["backup_id"] == unfinished.backup_id
    assert any(w.startswith("reconciled: vda") for w in resumed["warnings"])
    assert overlay_files(tmp_path) == []
    with open_session("web01", config).driver() as driver:
        assert all(not d.hotvm_overlays for d in driver.list_disks())
