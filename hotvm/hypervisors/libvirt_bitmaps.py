"""Change tracking for the libvirt driver: one libvirt checkpoint per disk and backup, read on the frozen
image.

Measured on libvirt 9.0 / QEMU 7.2: a checkpoint's bitmap survives hotvm's REDO cycle (libvirt carries
active bitmaps into the overlay of a disk-only snapshot and merges them back on commit), and when the next
snapshot freezes the image QEMU stores the bitmap in it. The frozen file then holds, consistently, every
write since the checkpoint; qemu-nbd exports it read-only with the bitmap and `qemu-img map` lists the
dirty extents, exactly as the QEMU driver reads its bitmaps. libvirt wants a checkpoint's bitmap named like
the checkpoint, so each disk gets its own checkpoint (and can drop it on its own).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt

from hotvm.child_env import child_env
from hotvm.hypervisors.base import BITMAP_PREFIX, BitmapUnusable, bitmap_name

NBD_TIMEOUT_S = 30
MAP_TIMEOUT_S = 600


def checkpoint_name(tag: str, device: str) -> str:
    return f"{bitmap_name(tag)}.{device}"


def create_checkpoint(dom: libvirt.virDomain, name: str, device: str, all_targets: list[str]) -> None:
    """A checkpoint of `device` only; one a failed attempt of the same backup left is replaced."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.checkpointLookupByName(name).delete(0)
    disks = "".join(
        f"<disk name={quoteattr(t)} checkpoint='{'bitmap' if t == device else 'no'}'/>" for t in all_targets
    )
    dom.checkpointCreateXML(
        f"<domaincheckpoint><name>{name}</name><disks>{disks}</disks></domaincheckpoint>", 0
    )


def delete_checkpoint(dom: libvirt.virDomain, name: str) -> bool:
    if not name.startswith(BITMAP_PREFIX):
        return False
    try:
        dom.checkpointLookupByName(name).delete(0)
    except libvirt.libvirtError:
        return False
    return True


def image_bitmap(image: str, name: str) -> dict:
    """The bitmap as stored in the (frozen) qcow2 file; raises BitmapUnusable when it cannot be trusted."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", image],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )
    if proc.returncode != 0:
        raise BitmapUnusable(f"cannot read {image}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    found = next((b for b in bitmaps if b.get("name") == name), None)
    if found is None:
        raise BitmapUnusable(f"bitmap {name} is not stored in {image} (raw image, or removed?)")
    flags = found.get("flags", [])
    if "in-use" in flags:
        raise BitmapUnusable(f"bitmap {name} in {image} is marked in-use (not stored cleanly: QEMU crashed?)")
    if "auto" not in flags:
        raise BitmapUnusable(f"bitmap {name} in {image} is disabled: it stopped recording at some point")
    return {"virtual_size": int(info["virtual-size"]), **found}


def read_extents(image: str, fmt: str, name: str) -> list[tuple[int, int]]:
    """(start, length) of every dirty range of bitmap `name` in the frozen `image`."""
    virtual_size = image_bitmap(image, name)["virtual_size"]
    with tempfile.TemporaryDirectory(prefix="hotvm-nbd-") as tmp:
        sock = Path(tmp) / "nbd.sock"
        # locking=off: QEMU holds the frozen image open read-only as a backing file; nobody writes it now
        opts = f"driver={fmt},file.driver=file,file.filename={image},file.locking=off"
        cmd = ["qemu-nbd", "--read-only", "--persistent", f"--socket={sock}", f"--bitmap={name}"]
        server = subprocess.Popen(
            [*cmd, "--image-opts", opts],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env=child_env(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + NBD_TIMEOUT_S
            while not sock.exists():
                if server.poll() is not None:
                    err = server.stderr.read().decode().strip() if server.stderr else ""
                    raise BitmapUnusable(f"qemu-nbd cannot export bitmap {name} of {image}: {err}")
                if time.monotonic() > deadline:
                    raise BitmapUnusable(f"qemu-nbd did not start within {NBD_TIMEOUT_S}s for {image}")
                time.sleep(0.01)
            nbd = f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
            try:
                proc = subprocess.run(
                    ["qemu-img", "map", "--output=json", "--image-opts", nbd],
                    capture_output=True, text=True, timeout=MAP_TIMEOUT_S, env=child_env(),
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise BitmapUnusable(f"qemu-img map of bitmap {name} timed out") from None
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    if proc.returncode != 0:
        raise BitmapUnusable(f"qemu-img map of bitmap {name} over NBD failed: {proc.stderr.strip()}")
    entries = json.loads(proc.stdout)
    # With x-dirty-bitmap the client reports the bitmap in place of allocation: "data": false means DIRTY.
    covered = sum(int(e["length"]) for e in entries)
    if covered != virtual_size:
        raise BitmapUnusable(f"bitmap {name}: NBD map covers {covered} of {virtual_size} bytes")
    return [(int(e["start"]), int(e["length"])) for e in entries if not e["data"]]
