"""The partitions of a disk as Linux numbers them, found by The Sleuth Kit's volume system code.

TSK reads MBR (with the extended/logical chain) and GPT; we keep only allocated data partitions and name
them like the guest kernel would (vda1, vda5, ...) so a user finds "p5" where the guest shows /dev/vda5.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytsk3

from hotvm.files.blockdev import BlockSource


@dataclass(frozen=True)
class Volume:
    device: str
    """The disk's device name (given by the caller)."""
    name: str
    """'p1', 'p2', ... as Linux numbers them (MBR logical partitions p5+), or 'disk' for a whole-disk fs."""
    start: int
    """Byte offset on the disk."""
    length: int
    scheme: str
    """'mbr' | 'gpt' | 'none'."""
    description: str
    """The partition type as TSK describes it (GPT: the partition's name, TSK does not name GPT types)."""

    @property
    def key(self) -> str:
        return f"{self.device}-{self.name}"


class TskImage(pytsk3.Img_Info):
    """A BlockSource seen by TSK as a disk image (TSK pulls bytes through read())."""

    def __init__(self, source: BlockSource) -> None:
        self._source = source
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def close(self) -> None:  # the source belongs to the caller
        pass

    def read(self, offset: int, size: int) -> bytes:
        return self._source.read(offset, size)

    def get_size(self) -> int:
        return self._source.size


_SCHEMES = {int(pytsk3.TSK_VS_TYPE_DOS): "mbr", int(pytsk3.TSK_VS_TYPE_GPT): "gpt"}


def _linux_number(scheme: str, part: pytsk3.TSK_VS_PART_INFO) -> int:
    """MBR: primary slots are 1-4, the n-th extended boot record's partition is 4+n. GPT: entry index+1."""
    if scheme == "mbr" and part.table_num > 0:
        return 4 + part.table_num
    return part.slot_num + 1


def find_volumes(source: BlockSource, device: str) -> list[Volume]:
    """Every allocated data partition of the disk; a disk without a partition table is one 'disk' volume
    (a file system on the whole disk, or nothing open_filesystem can read)."""
    image = TskImage(source)
    try:
        vs = pytsk3.Volume_Info(image)
    except OSError:
        return [Volume(device, "disk", 0, source.size, "none", "no partition table")]
    scheme = _SCHEMES.get(int(vs.info.vstype))
    if scheme is None:
        return [Volume(device, "disk", 0, source.size, "none", "no partition table")]
    block = vs.info.block_size
    volumes = []
    for part in vs:
        if not int(part.flags) & int(pytsk3.TSK_VS_PART_FLAG_ALLOC):
            continue
        # TSK flags the protective MBR ("Safety Table"), headers and tables as META, free space as UNALLOC.
        description = part.desc.decode("utf-8", "replace").strip() or f"{scheme.upper()} partition"
        name = f"p{_linux_number(scheme, part)}"
        volumes.append(Volume(device, name, part.start * block, part.len * block, scheme, description))
    return sorted(volumes, key=lambda v: v.start)
