"""Guest file systems read from real images (made with sfdisk and mkfs.*), a running VM's qcow2, and an
image backup set; files written back through loop mounts. Needs root (loop devices) and /dev/fuse."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fs_images import MiB, Node, PartSpec, build_disk, partitions, populate, to_qcow2
from qemu_helpers import DiskSpec

from hotvm.config import TargetConfig
from hotvm.errors import HotvmError
from hotvm.files.blockdev import open_backup_disk, open_image
from hotvm.files.fs import FileEntry, Filesystem, FilesystemUnreadable, open_filesystem
from hotvm.files.mount import loop_device, mounted_volume
from hotvm.files.volumes import Volume, find_volumes
from hotvm.formats.export import export_image
from hotvm.formats.repository import Repository
from targets import open_target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="building guest file systems needs root")

T0 = 1_700_000_000  # fixed mtimes (even seconds: FAT keeps 2 s)
BIG = os.urandom(5 * MiB + 123)
SPARSE = bytes(3 * MiB) + b"tail after a hole"


def unix_tree() -> list[Node]:
    return [
        Node("/docs", mode=0o750, uid=1000, gid=100, mtime=T0),
        Node(
            "/docs/sales 2026.xls", b"quarterly numbers\n" * 300, mode=0o640, uid=1000, gid=100, mtime=T0 + 2
        ),
        Node("/docs/deep/er/still.txt", b"deep", mode=0o600, uid=33, gid=33, mtime=T0 + 4),
        Node("/big.bin", BIG, mode=0o644, mtime=T0 + 6),
        Node("/sparse.img", SPARSE, mode=0o644, mtime=T0 + 8),
        Node("/run.sh", b"#!/bin/sh\necho hi\n", mode=0o4755, mtime=T0 + 10),
        Node("/empty", b"", mtime=T0 + 12),
        Node("/link", symlink="docs/sales 2026.xls"),
        Node("/docs/hard", hardlink_to="/docs/sales 2026.xls"),
    ]


def windows_tree() -> list[Node]:
    return [
        Node("/Users/ann/report.doc", b"report " * 1000, mtime=T0 + 2),
        Node("/big.bin", BIG, mtime=T0 + 6),
        Node("/Users/ann/notes.txt", b"notes", mtime=T0 + 4),
    ]


NTFS_TREE = [*windows_tree(), Node("/Users/ann/same.txt", hardlink_to="/Users/ann/notes.txt")]


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt") / "gpt.img"
    parts = [
        PartSpec("ext4", 24, unix_tree(), label="root"),
        PartSpec("vfat", 40, windows_tree(), label="EFI"),
        PartSpec("ntfs", 16, NTFS_TREE, label="Data"),
        PartSpec("garbage", 4),
    ]
    return build_disk(path, parts, "gpt")


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mbr") / "mbr.img"
    parts = [
        PartSpec("ext2", 16, unix_tree()),
        PartSpec("vfat", 8, windows_tree()[:1]),
        PartSpec("empty", 4),
        PartSpec("ext3", 16, unix_tree()),  # logical: p5
        PartSpec("ntfs", 8),  # logical: p6
    ]
    return build_disk(path, parts, "mbr")


def walk(fs: Filesystem) -> dict[str, FileEntry]:
    return {e.path: e for e in fs.walk()}


def content(fs: Filesystem, entry: FileEntry) -> bytes:
    return b"".join(fs.read(entry, block=256 * 1024))


def volume(source, device: str, name: str) -> Volume:  # noqa: ANN001
    return next(v for v in find_volumes(source, device) if v.name == name)


# ---- volumes
def test_gpt_partitions_found_where_sfdisk_put_them(gpt_disk: Path) -> None:
    with open_image(gpt_disk) as src:
        vols = find_volumes(src, "vda")
    assert [v.name for v in vols] == ["p1", "p2", "p3", "p4"]
    assert [(v.start, v.length) for v in vols] == partitions(gpt_disk)
    assert {v.scheme for v in vols} == {"gpt"} and vols[0].key == "vda-p1"


def test_mbr_logical_partitions_numbered_like_linux(mbr_disk: Path) -> None:
    with open_image(mbr_disk) as src:
        vols = find_volumes(src, "sdb")
    assert [v.name for v in vols] == ["p1", "p2", "p3", "p5", "p6"]  # p4 is the extended container
    assert [(v.start, v.length) for v in vols] == partitions(mbr_disk)
    assert vols[1].description.startswith("Win95 FAT32") and "NTFS" in vols[4].description


# ---- unix file systems
def check_unix_tree(fs: Filesystem) -> None:
    entries = walk(fs)
    expected = {n.path for n in unix_tree()} | {"/docs/deep", "/docs/deep/er", "/lost+found"}
    assert set(entries) == expected
    paths = list(entries)
    assert paths.index("/docs") < paths.index("/docs/deep") < paths.index("/docs/deep/er/still.txt")
    for node in unix_tree():
        entry = entries[node.path]
        if node.symlink:
            assert (entry.kind, entry.target) == ("symlink", node.symlink)
            continue
        if node.hardlink_to:
            original = entries[node.hardlink_to]
            assert entry.inode == original.inode and entry.nlink == original.nlink == 2
            continue
        assert (entry.mode, entry.uid, entry.gid) == (node.mode, node.uid, node.gid), node.path
        assert entry.mtime_ns == int(node.mtime * 1e9), node.path
        if node.data is None:
            assert entry.kind == "dir" and entry.size == 0
        else:
            assert entry.kind == "file" and entry.size == len(node.data)
            assert content(fs, entry) == node.data, node.path


@pytest.mark.parametrize(("disk", "name", "fstype"), [("gpt", "p1", "ext4"), ("mbr", "p1", "ext2"),
                                                       ("mbr", "p5", "ext3")])  # fmt: skip
def test_ext_file_systems_walk_and_read(
    request: pytest.FixtureRequest, disk: str, name: str, fstype: str
) -> None:
    image = request.getfixturevalue(f"{disk}_disk")
    with open_image(image) as src, open_filesystem(src, volume(src, "vda", name)) as fs:
        assert fs.fstype == fstype
        assert fs.label == ("root" if disk == "gpt" else None)
        check_unix_tree(fs)


def test_sparse_file_reads_as_zeros_and_is_sparse_on_disk(gpt_disk: Path) -> None:
    with open_image(gpt_disk) as src, open_filesystem(src, volume(src, "vda", "p1")) as fs:
        entry = walk(fs)["/sparse.img"]
        blocks = list(fs.read(entry, block=MiB))
    assert [len(b) for b in blocks] == [MiB, MiB, MiB, len(SPARSE) - 3 * MiB]
    assert b"".join(blocks) == SPARSE


# ---- Windows file systems
WINDOWS_CASES = [("p2", "vfat", "EFI", windows_tree()), ("p3", "ntfs", "Data", NTFS_TREE)]


@pytest.mark.parametrize(("name", "fstype", "label", "tree"), WINDOWS_CASES)
def test_windows_file_systems_walk_and_read(
    gpt_disk: Path, name: str, fstype: str, label: str, tree: list[Node]
) -> None:
    with open_image(gpt_disk) as src, open_filesystem(src, volume(src, "vda", name)) as fs:
        assert (fs.fstype, fs.label) == (fstype, label)
        entries = walk(fs)
        assert set(entries) == {n.path for n in tree} | {"/Users", "/Users/ann"}  # no $MFT, no label entry
        for node in tree:
            entry = entries[node.path]
            if node.hardlink_to:
                assert entry.inode == entries[node.hardlink_to].inode
                continue
            assert (entry.kind, entry.size, entry.mode, entry.uid) == ("file", len(node.data), 0o644, 0)
            assert entry.mtime_ns == node.mtime * 10**9, node.path
            assert content(fs, entry) == node.data
        assert entries["/Users"].mode == 0o755 and entries["/Users"].kind == "dir"


# ---- what cannot be read
def test_garbage_partition_named_and_others_still_read(gpt_disk: Path) -> None:
    with open_image(gpt_disk) as src:
        with pytest.raises(FilesystemUnreadable, match="vda-p4") as err:
            open_filesystem(src, volume(src, "vda", "p4"))
        assert "no readable file system" in str(err.value)
        with open_filesystem(src, volume(src, "vda", "p1")) as fs:
            assert "/big.bin" in walk(fs)


def test_whole_disk_without_file_system(tmp_path: Path) -> None:
    image = build_disk(tmp_path / "junk.img", [PartSpec("garbage", 8)], "none")
    with open_image(image) as src:
        [vol] = find_volumes(src, "vdb")
        assert (vol.name, vol.scheme, vol.start, vol.length) == ("disk", "none", 0, 8 * MiB)
        with pytest.raises(FilesystemUnreadable, match="vdb-disk"):
            open_filesystem(src, vol)


def test_whole_disk_file_system_and_swap_named(tmp_path: Path) -> None:
    image = build_disk(tmp_path / "whole.img", [PartSpec("ext4", 16, unix_tree()[:2], label="data")], "none")
    swap_disk = build_disk(tmp_path / "swap.img", [PartSpec("empty", 8)], "mbr")
    ((offset, length),) = partitions(swap_disk)
    with loop_device(swap_disk, offset, length) as dev:
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
    with open_image(image) as src:
        [vol] = find_volumes(src, "vdc")
        with open_filesystem(src, vol) as fs:
            assert (vol.name, fs.fstype, fs.label) == ("disk", "ext4", "data")
            assert set(walk(fs)) == {"/docs", "/docs/sales 2026.xls", "/lost+found"}
    with (
        open_image(swap_disk) as src,
        pytest.raises(FilesystemUnreadable, match="vdd-p1.*Linux swap: not supported"),
    ):
        open_filesystem(src, volume(src, "vdd", "p1"))


# ---- qcow2 through qemu-storage-daemon
def exports_left() -> list[str]:
    mounts = Path("/proc/mounts").read_text().splitlines()
    return [m for m in mounts if "hotvm-export-" in m]


def test_qcow2_of_a_running_vm_read_through_qemu(tmp_path: Path, gpt_disk: Path, qemu) -> None:  # noqa: ANN001
    base = to_qcow2(gpt_disk, tmp_path / "base.qcow2")
    top = tmp_path / "vm.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True
    )
    vm = qemu([DiskSpec("vda", top)])  # holds the image lock on top.qcow2 (and base.qcow2)
    with open_image(top) as src:
        assert src.size == gpt_disk.stat().st_size
        assert src.read(0, MiB) == gpt_disk.read_bytes()[:MiB]
        with open_filesystem(src, volume(src, "vda", "p1")) as fs:
            check_unix_tree(fs)
        assert len(exports_left()) == 1
    assert vm.proc.poll() is None and exports_left() == []
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("hotvm-export-*")]


def test_open_image_cleans_up_on_error(tmp_path: Path, gpt_disk: Path) -> None:
    image = to_qcow2(gpt_disk, tmp_path / "d.qcow2")
    with pytest.raises(KeyboardInterrupt), open_image(image):
        raise KeyboardInterrupt
    assert exports_left() == []
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(os.urandom(64 * 1024))
    with (
        pytest.raises(HotvmError, match="could not export .*broken.qcow2.*not in qcow2 format"),
        open_image(broken, fmt="qcow2"),
    ):
        pass
    assert exports_left() == []


# ---- image backup sets
def test_backup_set_reads_same_bytes_and_files(tmp_path: Path, gpt_disk: Path) -> None:
    repo = Repository(open_target(TargetConfig(name="t", url=f"file://{tmp_path}/target")))
    repo.ensure()
    record = export_image(repo, device="vda", image=str(gpt_disk))
    source = open_backup_disk(repo, record, cache_chunks=4)
    raw = gpt_disk.read_bytes()
    assert source.size == len(raw)
    for offset, length in [(0, 4096), (4 * MiB - 100, 300), (len(raw) - 10, 100), (3 * MiB, 9 * MiB)]:
        assert source.read(offset, length) == raw[offset : offset + length]
    spots = [(i * 7 * MiB // 3 % (len(raw) - MiB), 3 * MiB // 2) for i in range(48)]
    with ThreadPoolExecutor(8) as pool:  # more chunks in flight than the cache holds
        got = list(pool.map(lambda spot: source.read(*spot), spots))
    assert got == [raw[o : o + n] for o, n in spots]
    with open_image(gpt_disk) as original:
        for name in ("p1", "p2", "p3"):
            with (
                open_filesystem(original, volume(original, "vda", name)) as a,
                open_filesystem(source, volume(source, "vda", name)) as b,
            ):
                want, got = walk(a), walk(b)
                assert got == want
                for entry in got.values():
                    assert content(b, entry) == content(a, entry)


# ---- writing back (hybrid restore)
def loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("name", ["p1", "p2", "p3"])
def test_mounted_volume_round_trip(tmp_path: Path, gpt_disk: Path, name: str) -> None:
    image = tmp_path / "restored.img"
    shutil.copyfile(gpt_disk, image)
    with open_image(image) as src:
        vol = volume(src, "vda", name)
        with open_filesystem(src, vol) as fs:
            fstype = fs.fstype
    payload = os.urandom(300_000)
    with mounted_volume(image, vol, fstype) as root:
        flags = os.statvfs(root).f_flag  # the guest's setuid files, devices and programs stay inert here
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV and flags & os.ST_NOEXEC
        (root / "restored").mkdir()
        (root / "restored" / "file.bin").write_bytes(payload)
        os.utime(root / "restored" / "file.bin", (T0, T0))
        mountpoint = root
    assert not mountpoint.exists() and loops_of(image) == ""
    with open_image(image) as src, open_filesystem(src, vol) as fs:
        entries = walk(fs)
        entry = entries["/restored/file.bin"]
        assert content(fs, entry) == payload
        assert "/big.bin" in entries  # what was there is still there
        if fstype != "vfat":  # fusefat (this host's kernel has no vfat) stores the month off by one
            assert entry.mtime_ns == T0 * 10**9


def test_mounted_volume_unmounts_on_error(tmp_path: Path, gpt_disk: Path) -> None:
    image = tmp_path / "restored.img"
    shutil.copyfile(gpt_disk, image)
    with open_image(image) as src:
        vol = volume(src, "vda", "p1")
    with pytest.raises(RuntimeError), mounted_volume(image, vol, "ext4") as root:
        (root / "half").write_bytes(b"x")
        raise RuntimeError("restore failed")
    assert not root.exists() and loops_of(image) == ""
    with (
        pytest.raises(HotvmError, match="cannot mount ext4 volume vda-p4"),
        mounted_volume(image, volume_at(image, "p4"), "ext4"),
    ):
        pass
    assert loops_of(image) == ""


def volume_at(image: Path, name: str) -> Volume:
    with open_image(image) as src:
        return volume(src, "vda", name)


# ---- the image builder other tests rely on
@pytest.mark.parametrize(("index", "fstype"), [(0, "ext4"), (1, "vfat"), (2, "ntfs")])
def test_populate_changes_files_between_backups(
    tmp_path: Path, gpt_disk: Path, index: int, fstype: str
) -> None:
    image = tmp_path / "changed.img"
    shutil.copyfile(gpt_disk, image)
    old = "/docs/deep/er/still.txt" if fstype == "ext4" else "/Users/ann/notes.txt"
    renamed = "/big.bin" if fstype == "ext4" else "/Users/ann/report.doc"
    populate(
        image,
        index,
        fstype,
        [Node("/new/added.txt", b"added", mtime=T0 + 100), Node("/big.bin", b"rewritten", mtime=T0 + 102)],
        remove=[old],
        rename={renamed: "/moved.bin"} if fstype != "ext4" else {"/run.sh": "/docs/run.sh"},
    )
    with open_image(image) as src, open_filesystem(src, volume(src, "vda", f"p{index + 1}")) as fs:
        entries = walk(fs)
        assert old not in entries and "/new/added.txt" in entries
        assert content(fs, entries["/new/added.txt"]) == b"added"
        assert content(fs, entries["/big.bin"]) == b"rewritten"
        assert entries["/big.bin"].mtime_ns == (T0 + 102) * 10**9
        if fstype == "ext4":
            assert "/docs/run.sh" in entries and "/run.sh" not in entries
        else:
            assert content(fs, entries["/moved.bin"]) == b"report " * 1000
