"""Build the demo guest's initramfs: busybox-static, the virtio-blk modules and the two scripts.

Pure Python (newc cpio + gzip, fixed timestamps) so the output is byte-identical for the same inputs and
can be cached by content; no root needed for the /dev/console node. Debian builds virtio as modules, so
they are copied from /lib/modules with their dependencies, decompressed because busybox insmod cannot
read every compression the kernel packages use.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.guest.errors import GuestError
from hotvm.guest.scripts import DEFAULT_INTERVAL, WRITER_PATH, init_script, writer_script

VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
BASE_DIRS = ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules")

# --------------------------------------------------------------------------- optional guest agent
# The agent variant (build_initramfs(agent=True)) adds Debian's qemu-ga with its shared libraries, the
# virtio console (the agent's channel) and ext4 (a file system for it to freeze: the second disk, /dev/vdb,
# made with mkfs.ext4 on the host). The plain demo initramfs stays as small and fast as before.
QEMU_GA = Path("/usr/sbin/qemu-ga")
AGENT_MODULES = ("virtio_console", "crc32c_generic", "ext4")
AGENT_SCRIPT = "/bin/hotvm-agent"
FS_MOUNT = "/mnt/fs"
FS_BEAT_LOG = "beat.log"
"""The guest appends a counter to FS_MOUNT/beat.log and prints HOTVM-FSBEAT seq=N: stalls while frozen."""
AGENT_SH = r"""#!/bin/sh
# hotvm demo guest: mount the ext4 disk, keep writing to it, and run qemu-ga on its virtio port.
say() { echo "$*" > /dev/ttyS0; }
mkdir -p @MOUNT@ /run /var/run
i=0
while [ ! -b /dev/vdb ] && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
if mount -t ext4 /dev/vdb @MOUNT@; then
    say "HOTVM-FS mounted"
    (
        n=0
        [ -f @MOUNT@/@BEAT@ ] && n=$(wc -l < @MOUNT@/@BEAT@)
        while :; do
            n=$((n + 1))
            echo "$n" >> @MOUNT@/@BEAT@
            say "HOTVM-FSBEAT seq=$n"
            sleep 0.3
        done
    ) &
else
    say "HOTVM-ERROR cannot mount /dev/vdb (ext4)"
fi
port=
i=0
while [ -z "$port" ] && [ $i -lt 300 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    i=$((i + 1))
    [ -n "$port" ] || sleep 0.1
done
if [ -z "$port" ] || [ ! -c "$port" ]; then
    say "HOTVM-ERROR no org.qemu.guest_agent.0 port"
    exit 1
fi
mkdir -p /dev/virtio-ports
ln -sf "$port" /dev/virtio-ports/org.qemu.guest_agent.0
syslogd -O /dev/ttyS0  # qemu-ga logs each freeze/thaw to syslog: they show on the serial console
say "HOTVM-AGENT starting on $port"
exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -l /dev/ttyS0
"""
AGENT_INIT = r"""#!/bin/busybox sh
# hotvm demo guest with agent: load the modules, start the agent side, then the usual demo /init
# (which mounts /proc, /sys and /dev: the agent side waits for its devices).
/bin/busybox --install -s /bin
export PATH=/bin
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "HOTVM-ERROR insmod $m failed" > /dev/ttyS0
done
@AGENT@ &
exec /bin/busybox sh /hotvm-init
"""


@dataclass(frozen=True)
class GuestKernel:
    version: str
    image: Path
    modules_dir: Path


def find_kernel(
    version: str | None = None, boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> GuestKernel:
    """The host's installed kernel with modules (the running one if installed, else the newest)."""
    hint = "apt-get install --no-install-recommends linux-image-amd64"
    candidates = [p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*")]
    candidates = [v for v in candidates if (modules_root / v / "modules.dep").is_file()]
    if version is None:
        if not candidates:
            raise GuestError(f"no kernel with modules in {boot} and {modules_root}", hint)
        running = os.uname().release
        version = running if running in candidates else sorted(candidates, key=_version_key)[-1]
    elif version not in candidates:
        raise GuestError(f"kernel {version} (vmlinuz and modules.dep) is not installed", hint)
    image = boot / f"vmlinuz-{version}"
    if not os.access(image, os.R_OK):
        raise GuestError(f"{image} is not readable", "run as root or make it readable (chmod 644)")
    return GuestKernel(version, image, modules_root / version)


def resolve_modules(modules_dir: Path, names: tuple[str, ...] = VIRTIO_MODULES) -> list[tuple[str, Path]]:
    """(name, file) of `names` and their dependencies in load order; built-in modules are skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[_module_name(target)] = (target, [_module_name(d) for d in rest.split()])
    builtin_file = modules_dir / "modules.builtin"
    builtin = {_module_name(x) for x in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name not in deps:
            raise GuestError(
                f"kernel module {name} not found in {modules_dir}",
                f"needed by {' -> '.join(chain) or 'the demo guest'}; install the full kernel",
            )
        # modules.dep lists a module's deps with the ones loaded last first: visit them reversed.
        for dep in reversed(deps[name][1]):
            visit(dep, (*chain, name))
        order.append(name)

    for name in names:
        visit(name.replace("-", "_"), ())
    return [(n, modules_dir / deps[n][0]) for n in order]


def build_initramfs(
    out: Path,
    kernel: GuestKernel | None = None,
    busybox: Path | None = None,
    interval: float = DEFAULT_INTERVAL,
    agent: bool = False,
) -> Path:
    """Write the gzip'ed cpio to `out` (atomically) and return it. agent: also qemu-ga (see above)."""
    kernel = kernel or find_kernel()
    busybox = busybox or find_static_busybox()
    modules = resolve_modules(kernel.modules_dir, VIRTIO_MODULES + (AGENT_MODULES if agent else ()))
    archive = _Cpio()
    for d in BASE_DIRS:
        archive.add_dir(d)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file(WRITER_PATH.lstrip("/"), writer_script(interval).encode(), 0o755)
    for name, path in modules:
        archive.add_file(f"lib/modules/{name}.ko", read_module(path), 0o644)
    names = [n for n, _ in modules]
    if agent:
        _add_agent(archive)
        # The agent's /init loads every module and starts the agent side; the demo /init then loads none.
        archive.add_file("hotvm-init", init_script([], interval).encode(), 0o755)
        init = AGENT_INIT.replace("@MODULES@", " ".join(names)).replace("@AGENT@", AGENT_SCRIPT)
        archive.add_file("init", init.encode(), 0o755)
    else:
        archive.add_file("init", init_script(names, interval).encode(), 0o755)
    data = gzip.compress(archive.finish(), compresslevel=9, mtime=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def agent_libraries(binary: Path = QEMU_GA) -> list[Path]:
    """The shared libraries `binary` loads (its ELF interpreter included), as `ldd` resolves them."""
    if not binary.is_file():
        raise GuestError(f"{binary} not found", "apt-get install qemu-guest-agent")
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, env=child_env())
    if proc.returncode != 0:
        raise GuestError(f"ldd {binary} failed: {proc.stderr.strip()}", "check the binary")
    libs = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def _add_agent(archive: _Cpio) -> None:
    """qemu-ga and its libraries at their host paths (the ELF interpreter path is fixed in the binary)."""
    dirs = {"usr", "usr/sbin", "mnt", "run", "var", "etc"}
    files = [QEMU_GA, *agent_libraries()]
    for path in files:
        parent = path.parent
        while str(parent) != "/":
            dirs.add(str(parent).lstrip("/"))
            parent = parent.parent
    for d in sorted(dirs - set(BASE_DIRS), key=lambda p: (p.count("/"), p)):
        archive.add_dir(d)  # real directories here even where the host has merged-/usr symlinks
    for path in files:
        archive.add_file(str(path).lstrip("/"), path.resolve().read_bytes(), 0o755)
    archive.add_char_device("dev/null", 1, 3)  # ash opens it for `cmd &` before devtmpfs is mounted
    script = AGENT_SH.replace("@MOUNT@", FS_MOUNT).replace("@BEAT@", FS_BEAT_LOG)
    archive.add_file(AGENT_SCRIPT.lstrip("/"), script.encode(), 0o755)


def find_static_busybox() -> Path:
    """busybox from busybox-static: a dynamic one would need its libc in the initramfs too."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file() and _is_static_elf(Path(candidate)):
            return Path(candidate).resolve()
    raise GuestError("no statically linked busybox found", "apt-get install busybox-static")


def read_module(path: Path) -> bytes:
    """A kernel module's ELF bytes, decompressed if the distribution compresses modules."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        import zstandard  # only some distributions need it

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in version.replace("-", ".").split(".")]


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) program header."""
    with path.open("rb") as fh:
        head = fh.read(64)
        if head[:5] != b"\x7fELF\x02":
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


class _Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def add_dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0, nlink=1)
        return self._buf.getvalue()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            ino, self._ino = self._ino, self._ino + 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))
