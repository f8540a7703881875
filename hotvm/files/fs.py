"""Files of one guest file system, read with The Sleuth Kit (pytsk3): read-only, from any BlockSource.

TSK parses the on-disk structures itself, so nothing is mounted and a frozen base image, a FUSE export of
a qcow2 chain or a backup set all read the same way. One lock serialises TSK calls on a file system
(TSK's FS_Info is not thread-safe); walk() lists a directory under the lock, then yields without it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytsk3

from hotvm.errors import HotvmError
from hotvm.files.blockdev import BlockSource
from hotvm.files.volumes import TskImage, Volume
from hotvm.safepath import printable

Kind = Literal["file", "dir", "symlink", "other"]


class FilesystemUnreadable(HotvmError):
    """A volume holds no file system TSK reads (unknown, corrupt, or a container such as LVM or LUKS)."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    """Absolute inside the file system, '/' separated; the root itself is never yielded."""
    kind: Kind
    size: int
    """Bytes of data (directories: 0)."""
    mode: int
    """Permission bits (0o7777). FAT and NTFS have none: 0o755 for directories, 0o644 for files."""
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    inode: int
    """TSK metadata address: the same for hard links, stable while the file exists."""
    nlink: int
    target: str | None = None
    """A symlink's target."""


_FSTYPES = {
    int(pytsk3.TSK_FS_TYPE_EXT2): "ext2",
    int(pytsk3.TSK_FS_TYPE_EXT3): "ext3",
    int(pytsk3.TSK_FS_TYPE_EXT4): "ext4",
    int(pytsk3.TSK_FS_TYPE_FAT12): "vfat",
    int(pytsk3.TSK_FS_TYPE_FAT16): "vfat",
    int(pytsk3.TSK_FS_TYPE_FAT32): "vfat",
    int(pytsk3.TSK_FS_TYPE_EXFAT): "exfat",
    int(pytsk3.TSK_FS_TYPE_NTFS): "ntfs",
    int(pytsk3.TSK_FS_TYPE_ISO9660): "iso9660",
    int(pytsk3.TSK_FS_TYPE_HFS): "hfs",
    int(pytsk3.TSK_FS_TYPE_APFS): "apfs",
    int(pytsk3.TSK_FS_TYPE_FFS1): "ufs1",
    int(pytsk3.TSK_FS_TYPE_FFS1B): "ufs1",
    int(pytsk3.TSK_FS_TYPE_FFS2): "ufs2",
    int(pytsk3.TSK_FS_TYPE_YAFFS2): "yaffs2",
}
_KINDS: dict[int, Kind] = {
    int(pytsk3.TSK_FS_META_TYPE_REG): "file",
    int(pytsk3.TSK_FS_META_TYPE_DIR): "dir",
    int(pytsk3.TSK_FS_META_TYPE_LNK): "symlink",
}
_VIRTUAL = {int(pytsk3.TSK_FS_META_TYPE_VIRT), int(pytsk3.TSK_FS_META_TYPE_VIRT_DIR)}
_ALLOC_NAME = int(pytsk3.TSK_FS_NAME_FLAG_ALLOC)
_ALLOC_META = int(pytsk3.TSK_FS_META_FLAG_ALLOC)
NTFS_FIRST_USER_INODE = 16
"""MFT records below 16 are NTFS's own files ($MFT ... $Extend): not guest data."""
FAT_LABEL_SUFFIX = " (Volume Label Entry)"
"""How TSK names the FAT volume label's directory entry."""

# Signatures of what TSK cannot open but a user should be told about: (offset, magic, name).
_SIGNATURES = [
    (512, b"LABELONE", "an LVM physical volume"),
    (536, b"LVM2 001", "an LVM physical volume"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (4086, b"SWAPSPACE2", "Linux swap"),
    (4086, b"SWAP-SPACE", "Linux swap"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (0, b"XFSB", "XFS"),
    (3, b"-FVE-FS-", "a BitLocker encrypted volume"),
]
_DETECT_BYTES = 0x10048


def _recognise(source: BlockSource, volume: Volume) -> str | None:
    head = source.read(volume.start, min(_DETECT_BYTES, volume.length))
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _ns(seconds: int, nanos: int) -> int:
    return int(seconds) * 1_000_000_000 + int(nanos or 0)


class Filesystem:
    """One opened guest file system (use as a context manager)."""

    def __init__(self, source: BlockSource, volume: Volume, fs: pytsk3.FS_Info, image: TskImage) -> None:
        self.volume = volume
        self._source = source
        self._fs = fs
        self._image = image  # TSK reads through it: keep it alive as long as the FS_Info
        self._lock = threading.Lock()
        self.refused: list[str] = []
        """Entries not listed because their name cannot be a name ('/' or NUL in it: a forged directory
        entry), each as 'path: why' (printable)."""
        ftype = int(fs.info.ftype)
        self.fstype = _FSTYPES.get(ftype) or pytsk3.TSK_FS_TYPE_ENUM(ftype).name.removeprefix("TSK_FS_TYPE_")
        self.fstype = self.fstype.lower()
        self._unix = self.fstype in ("ext2", "ext3", "ext4", "ufs1", "ufs2")
        self.label = self._read_label()

    # ---- labels: TSK parses the structures but does not hand out the volume name
    def _read_label(self) -> str | None:
        try:
            if self.fstype.startswith("ext"):
                raw = self._source.read(self.volume.start + 1024 + 120, 16)
                return raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None
            if self.fstype == "vfat":
                boot = self._source.read(self.volume.start, 512)
                fat32 = struct.unpack_from("<H", boot, 0x16)[0] == 0  # sectors per FAT (16 bit) is 0
                raw = boot[0x47:0x52] if fat32 else boot[0x2B:0x36]
                label = raw.decode("cp437", "replace").strip()
                return None if label in ("", "NO NAME") else label
            if self.fstype == "ntfs":
                with self._lock:
                    volume_file = self._fs.open_meta(inode=3)
                    for attr in volume_file:
                        if int(attr.info.type) == int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_VNAME):
                            size = attr.info.size
                            raw = volume_file.read_random(0, size, attr.info.type, attr.info.id)
                            return raw.decode("utf-16-le", "replace") or None
        except (OSError, struct.error):
            return None
        return None

    # ---- walking
    def _entry(self, path: str, meta: pytsk3.TSK_FS_META, item: pytsk3.File | None = None) -> FileEntry:
        kind = _KINDS.get(int(meta.type), "other")
        if self._unix:
            mode, uid, gid = int(meta.mode) & 0o7777, int(meta.uid), int(meta.gid)
        else:  # FAT has no owners; NTFS has SIDs, which TSK turns into numbers that mean nothing on Linux
            mode, uid, gid = (0o755 if kind == "dir" else 0o644), 0, 0
        target = None
        if kind == "symlink" and meta.link:
            link = meta.link
            target = link.decode("utf-8", "surrogateescape") if isinstance(link, bytes) else str(link)
        elif kind == "symlink" and item is not None and 0 < int(meta.size) <= 4096:
            target = self._slow_link(item, int(meta.size))
        return FileEntry(
            path=path,
            kind=kind,
            size=0 if kind == "dir" else int(meta.size),
            mode=mode,
            uid=uid,
            gid=gid,
            mtime_ns=_ns(meta.mtime, meta.mtime_nano),
            atime_ns=_ns(meta.atime, meta.atime_nano),
            ctime_ns=_ns(meta.ctime, meta.ctime_nano),
            inode=int(meta.addr),
            nlink=int(meta.nlink),
            target=target,
        )

    @staticmethod
    def _slow_link(item: pytsk3.File, size: int) -> str | None:
        """A symlink whose target did not fit in its inode (ext4: over 60 bytes) keeps it as file data,
        which TSK does not hand out as meta.link."""
        try:
            raw = item.read_random(0, size)
        except OSError:
            return None
        return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") or None

    def _list(self, inode: int, path: str) -> list[FileEntry]:
        """Allocated children of one directory (TSK's virtual entries and NTFS's own files left out)."""
        entries = []
        at_root = inode == self._fs.info.root_inum
        with self._lock:
            try:
                directory = self._fs.open_dir(inode=inode)
            except OSError:
                return []  # unreadable directory: its files cannot be listed, the rest still can
            for item in directory:
                name_info = item.info.name
                meta = item.info.meta
                if meta is None or name_info is None:
                    continue
                raw = name_info.name
                if raw in (b".", b"..") or not int(name_info.flags) & _ALLOC_NAME:
                    continue
                if not int(meta.flags) & _ALLOC_META or int(meta.type) in _VIRTUAL:
                    continue
                name = raw.decode("utf-8", "surrogateescape")
                if "/" in name or "\0" in name:  # no file system makes these: the guest forged it
                    shown = printable(("" if path == "/" else path) + "/" + name)
                    self.refused.append(f"{shown}: the name holds '/' or NUL; not backed up")
                    continue
                if at_root and self._is_fs_own(name, meta):
                    continue
                prefix = "" if path == "/" else path
                entries.append(self._entry(f"{prefix}/{name}", meta, item))
        return entries

    def _is_fs_own(self, name: str, meta: pytsk3.TSK_FS_META) -> bool:
        """NTFS's metadata files, and the FAT volume label that TSK lists as a root entry."""
        if self.fstype == "ntfs":
            return name.startswith("$") and int(meta.addr) < NTFS_FIRST_USER_INODE
        if self.fstype == "vfat":
            return name.endswith(FAT_LABEL_SUFFIX) and int(meta.size) == 0
        return False

    def walk(self) -> Iterator[FileEntry]:
        """Every allocated entry, parents before children; iterative, symlinks not followed, each
        directory listed once (a damaged fs with a directory loop still ends)."""
        root = int(self._fs.info.root_inum)
        seen = {root}
        stack = [(root, "/")]
        while stack:
            inode, path = stack.pop()
            children = self._list(inode, path)
            for entry in children:
                yield entry
            for entry in reversed(children):
                if entry.kind == "dir" and entry.inode not in seen:
                    seen.add(entry.inode)
                    stack.append((entry.inode, entry.path))

    # ---- reading
    def read(self, entry: FileEntry, block: int = 1 << 20) -> Iterator[bytes]:
        """The file's data, exactly entry.size bytes in blocks (NTFS: the unnamed $DATA stream; holes
        and sparse runs read as zeros)."""
        if entry.kind != "file" or entry.size == 0:
            return
        with self._lock:
            handle = self._fs.open_meta(inode=entry.inode)
        offset = 0
        while offset < entry.size:
            want = min(block, entry.size - offset)
            with self._lock:
                try:
                    data = handle.read_random(offset, want)
                except OSError as exc:
                    raise FilesystemUnreadable(
                        f"{entry.path} on {self.volume.key}: read failed at byte {offset} ({exc})",
                        "the file system is damaged here; the other files still read",
                    ) from None
            if len(data) != want:
                raise FilesystemUnreadable(
                    f"{entry.path} on {self.volume.key}: {len(data)} bytes at {offset}, expected {want}",
                    "the file changed size or the file system is damaged",
                )
            offset += want
            yield data

    def close(self) -> None:
        self._fs = None
        self._image = None

    def __enter__(self) -> Filesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_filesystem(source: BlockSource, volume: Volume) -> Filesystem:
    """The file system on `volume`; FilesystemUnreadable (naming the volume and why) if TSK cannot read
    it, so a caller skips this one volume and carries on with the others."""
    image = TskImage(source)
    try:
        fs = pytsk3.FS_Info(image, offset=volume.start)
    except OSError as exc:
        known = _recognise(source, volume)
        if known:
            raise FilesystemUnreadable(
                f"volume {volume.key} ({volume.description}) holds {known}: not supported",
                "its files are not backed up file by file; the weekly image backup still covers it",
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no known file system"
        raise FilesystemUnreadable(
            f"volume {volume.key} ({volume.description}): no readable file system ({reason})",
            "an unknown or corrupt file system is skipped; the image backup still covers it",
        ) from None
    return Filesystem(source, volume, fs, image)
