"""Build real partitioned disk images with real file systems holding exactly the files a test asks for.

Tables come from sfdisk, file systems from mkfs.*, and files are written through a loop mount (ext2/3/4,
ntfs-3g) or with mtools (vfat: this host's kernel has no vfat module, and mtools keeps mtimes exactly), so
the images are what a guest would have. Needs root.

Partition numbering: table "gpt" gives p1..pN; "mbr" makes parts[0:3] primary (p1-p3) and, when there are
more, an extended partition (p4) holding the rest as logical partitions p5, p6, ...; "none" puts the single
part's file system on the whole disk. `part_index` in populate() is the position in the `parts` list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MiB = 1024 * 1024
_HOLE = 64 * 1024


@dataclass
class Node:
    """What a test wants in the guest file system. data None = a directory."""

    path: str
    data: bytes | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float | None = None
    symlink: str | None = None
    hardlink_to: str | None = None


@dataclass
class PartSpec:
    fstype: str
    """'ext4' | 'ext3' | 'ext2' | 'vfat' | 'ntfs' | 'garbage' (random bytes) | 'empty' (zeros)."""
    size_mb: int
    nodes: list[Node] = field(default_factory=list)
    label: str | None = None


_MBR_TYPES = {"vfat": "c", "ntfs": "7"}
_GPT_TYPES = {"vfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"}
_LINUX_GPT = "0FC63DAF-8483-4772-8E3D-3D0AF2D0B8E4"


def _run(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _table_script(parts: list[PartSpec], table: str) -> str:
    lines = [f"label: {'dos' if table == 'mbr' else 'gpt'}"]
    for i, part in enumerate(parts):
        if table == "mbr" and i == 3:
            lines.append("type=5")  # extended: the rest of the disk, logical partitions inside
        if table == "mbr":
            kind = _MBR_TYPES.get(part.fstype, "83")
        else:
            kind = _GPT_TYPES.get(part.fstype, _LINUX_GPT)
        lines.append(f"size={part.size_mb}MiB, type={kind}")
    return "\n".join(lines) + "\n"


def partitions(path: Path) -> list[tuple[int, int]]:
    """(byte offset, byte length) of each data partition in `parts` order (extended container left out);
    an image without a partition table is one whole-disk 'partition'."""
    proc = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return [(0, path.stat().st_size)]
    table = json.loads(proc.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    found = []
    for entry in table["partitions"]:
        if table["label"] == "dos" and entry["type"].lower() in ("5", "f", "85"):
            continue
        found.append((entry["start"] * sector, entry["size"] * sector))
    return found


def build_disk(
    path: Path,
    parts: list[PartSpec],
    table: Literal["mbr", "gpt", "none"] = "gpt",
    size_mb: int | None = None,
) -> Path:
    """A raw disk image holding `parts`, each formatted and filled with its nodes."""
    if table == "none" and len(parts) != 1:
        raise ValueError("table 'none' takes exactly one part (a file system on the whole disk)")
    logical = max(0, len(parts) - 3) if table == "mbr" else 0
    overhead = 0 if table == "none" else 2 + logical  # 1 MiB lead-in, GPT backup, one EBR gap per logical
    size = size_mb or sum(p.size_mb for p in parts) + overhead
    path = Path(path)
    with open(path, "wb") as fh:
        fh.truncate(size * MiB)
    if table != "none":
        _run(
            "sfdisk",
            "--quiet",
            "--no-reread",
            "--no-tell-kernel",
            str(path),
            stdin=_table_script(parts, table),
        )
    places = partitions(path)
    assert len(places) == len(parts), (places, parts)
    for (offset, length), part in zip(places, parts, strict=True):
        _format(path, offset, length, part)
        if part.nodes:
            populate(path, parts.index(part), part.fstype, part.nodes)
    return path


def _format(image: Path, offset: int, length: int, part: PartSpec) -> None:
    if part.fstype == "empty":
        return
    if part.fstype == "garbage":
        with open(image, "r+b") as fh:
            fh.seek(offset)
            fh.write(os.urandom(length))
        return
    label = part.label
    if part.fstype == "vfat":
        args = ["mkfs.vfat", "--offset", str(offset // 512)]
        if length >= 40 * MiB:
            args += ["-F", "32", "-s", "1"]
        if label:
            args += ["-n", label]
        _run(*args, str(image), str(length // 1024))
        return
    from hotvm.files.mount import loop_device

    with loop_device(image, offset, length) as dev:
        if part.fstype in ("ext2", "ext3", "ext4"):
            _run(f"mkfs.{part.fstype}", "-q", "-F", *(["-L", label] if label else []), dev)
        elif part.fstype == "ntfs":
            _run("mkntfs", "-F", "-Q", "-q", *(["-L", label] if label else []), dev)
        else:
            raise ValueError(f"unknown fstype {part.fstype!r}")


def _write_sparse(dest: Path, data: bytes) -> None:
    """All-zero 64 KiB blocks become holes, so a test gets a sparse file by writing zeros."""
    with open(dest, "wb") as fh:
        for pos in range(0, len(data), _HOLE):
            block = data[pos : pos + _HOLE]
            if block.count(0) == len(block):
                fh.seek(pos + len(block))
            else:
                fh.seek(pos)
                fh.write(block)
        fh.truncate(len(data))


def _materialise(root: Path, nodes: list[Node], keep_owner: bool) -> None:
    """Create `nodes` under `root` with their metadata; directory mtimes last (children change them)."""
    for node in nodes:
        dest = root / node.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if node.hardlink_to is not None:
            if dest.exists():
                dest.unlink()
            os.link(root / node.hardlink_to.lstrip("/"), dest)
            continue
        if node.symlink is not None:
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            os.symlink(node.symlink, dest)
        elif node.data is None:
            dest.mkdir(exist_ok=True)
        else:
            _write_sparse(dest, node.data)
        if keep_owner:
            os.chown(dest, node.uid, node.gid, follow_symlinks=False)
            if node.symlink is None:
                os.chmod(dest, node.mode)
    for node in sorted(nodes, key=lambda n: -n.path.count("/")):
        if node.mtime is not None and node.hardlink_to is None:
            os.utime(root / node.path.lstrip("/"), (node.mtime, node.mtime), follow_symlinks=False)


def populate(
    path: Path,
    part_index: int,
    fstype: str,
    nodes: list[Node],
    remove: Iterable[str] = (),
    rename: dict[str, str] | None = None,
) -> None:
    """Change the files of partition `part_index` (position in build_disk's `parts`): delete `remove`,
    rename old -> new, then write `nodes` (new files, or new content and metadata for existing ones)."""
    rename = rename or {}
    offset, length = partitions(Path(path))[part_index]
    if fstype == "vfat":
        _populate_vfat(Path(path), offset, nodes, remove, rename)
        return
    from hotvm.files.mount import loop_device

    with loop_device(Path(path), offset, length) as dev:
        mnt = Path(tempfile.mkdtemp(prefix="fs-images-"))
        if fstype == "ntfs":
            _run("ntfs-3g", dev, str(mnt))
        else:
            _run("mount", "-t", fstype, dev, str(mnt))
        try:
            for old in remove:
                victim = mnt / old.lstrip("/")
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                else:
                    victim.unlink()
            for old, new in rename.items():
                os.rename(mnt / old.lstrip("/"), mnt / new.lstrip("/"))
            _materialise(mnt, nodes, keep_owner=fstype != "ntfs")
        finally:
            subprocess.run(["sync"])
            _run("umount", str(mnt))
            mnt.rmdir()


def _populate_vfat(image: Path, offset: int, nodes: list[Node], remove: Iterable[str], rename: dict) -> None:
    """mtools writes straight into the image (no mount): mcopy -m keeps each file's mtime."""
    drive = f"{image}@@{offset}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def mtool(*args: str) -> None:
        proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")

    for old in remove:
        try:
            mtool("mdel", "-i", drive, f"::{old}")
        except RuntimeError:
            mtool("mdeltree", "-i", drive, f"::{old}")
    for old, new in rename.items():
        mtool("mmove", "-i", drive, f"::{old}", f"::{new}")
    if any(n.symlink or n.hardlink_to for n in nodes):
        raise ValueError("vfat has no symlinks or hard links")
    with tempfile.TemporaryDirectory(prefix="fs-images-vfat-") as stage:
        root = Path(stage)
        dirs = {str(p) for n in nodes for p in Path(n.path).parents if str(p) != "/"}
        dirs |= {n.path for n in nodes if n.data is None}
        for rel in sorted(dirs, key=lambda d: d.count("/")):  # parents first; existing ones are fine
            subprocess.run(["mmd", "-i", drive, f"::/{rel.lstrip('/')}"], capture_output=True, env=env)
        for node in nodes:
            rel = node.path.lstrip("/")
            if node.data is None:
                continue
            src = root / rel
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_bytes(node.data)
            if node.mtime is not None:
                os.utime(src, (node.mtime, node.mtime))
            mtool("mcopy", "-o", "-m", "-i", drive, str(src), f"::/{rel}")


def to_qcow2(raw: Path, dest: Path) -> Path:
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest))
    return Path(dest)
