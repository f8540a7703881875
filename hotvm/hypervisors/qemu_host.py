"""QEMU host operations: list the VMs of a host, register (and start) a copy of a backed-up VM on it.

A plain QEMU host has no VM registry, so "registering" writes a launch spec into `vm_dir/NAME/`: the
backed-up launch command with its disks, sockets, logs and (for a copy beside the original) MAC
addresses and UUID rewritten, as `launch.sh` plus `hotvm-vm.json`, and the VM's backed-up config files
under `config/` (the seed's VMX copy). Everything written is derived from the backup alone, so a rerun
with the same backup writes the same bytes: "unchanged"; a new config writes what differs: "updated".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import tempfile
import uuid
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.config import HostConfig
from hotvm.errors import ConfigError, HotvmError, HypervisorError
from hotvm.guest.qemu import UNIX_PATH_MAX, escape_opt, pid_alive, read_pid, render_script, tail
from hotvm.hypervisors.base import Capability, HostDriver, RegisterResult, VMDefinition
from hotvm.safepath import SafeRoot, component, under

log = logging.getLogger("hotvm.qemu")

SPEC_NAME = "hotvm-vm.json"
LAUNCH_NAME = "launch.sh"
START_TIMEOUT_S = 120
# Options whose value is a file QEMU only reads: kept, or taken from the backup when it holds the file.
_INPUT_OPTS = {"-kernel", "-initrd", "-bios", "-dtb"}
_SIMPLE_DISK_OPTS = {"-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb"}


class QemuHost(HostDriver):
    """base.HostDriver for a QEMU host: VMs are the configured ones plus the specs under vm_dir."""

    name = "qemu"
    capabilities = frozenset({Capability.REGISTER_VMS, Capability.RUNNING_STATE})

    def __init__(self, host: HostConfig) -> None:
        self.host = host

    def close(self) -> None:
        pass

    @property
    def vm_dir(self) -> Path:
        if self.host.vm_dir is None:
            raise ConfigError(
                f"host '{self.host.name}' has no vm_dir: hotvm does not know where to place VMs on it",
                f"set vm_dir: /var/lib/hotvm/vms under host '{self.host.name}' in hotvm.yaml",
            )
        return Path(self.host.vm_dir).resolve()

    def list_vms(self) -> list[str]:
        names = [vm.name for vm in self.host.vms]
        if self.host.vm_dir is not None and self.vm_dir.is_dir():
            names += sorted(d.name for d in self.vm_dir.iterdir() if (d / SPEC_NAME).is_file())
        return list(dict.fromkeys(names))

    def spec(self, name: str) -> dict | None:
        try:
            return json.loads((under(self.vm_dir, name, what="VM name") / SPEC_NAME).read_text())
        except FileNotFoundError:
            return None

    def running(self, name: str) -> bool:
        spec = self.spec(name)
        if spec is None:
            return False
        return pid_alive(read_pid(Path(spec["pidfile"])), spec["qmp"])

    # ------------------------------------------------------------------ register

    def register_vm(self, definition: VMDefinition, start: bool = False) -> RegisterResult:
        vmdir = under(self.vm_dir, definition.name, what="VM name")
        files = launch_files(definition, vmdir, self.host.name)
        with SafeRoot(vmdir) as root:  # names below config/ come from the (hostile) config archive
            existed = root.lstat(SPEC_NAME) is not None
            changed = [rel for rel, data in files.items() if root.read_bytes(rel) != data]
            for rel in changed:
                root.write_bytes(rel, files[rel], 0o755 if rel == LAUNCH_NAME else 0o644)
        action = "unchanged" if existed and not changed else "updated" if existed else "created"
        if changed and existed and self.running(definition.name):
            log.warning(
                "host %s: VM %s runs; its updated launch spec takes effect at its next start",
                self.host.name, definition.name,
            )  # fmt: skip
        started = self.start(definition.name) if start else False
        log.info("host %s: VM %s %s (%s)", self.host.name, definition.name, action, vmdir / LAUNCH_NAME)
        return RegisterResult(self.host.name, definition.name, action, started, str(vmdir / LAUNCH_NAME))

    def start(self, name: str) -> bool:
        """Run the VM's launch spec (QEMU daemonizes); True once it runs. Already running: True too."""
        spec = self.spec(name)
        if spec is None:
            raise HotvmError(f"no VM '{name}' registered on host '{self.host.name}'", "register it first")
        if self.running(name):
            return True
        for stale in (spec["qmp"], spec["pidfile"]):
            Path(stale).unlink(missing_ok=True)
        with tempfile.TemporaryFile() as out:
            proc = subprocess.run(
                spec["command"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, timeout=START_TIMEOUT_S, env=child_env(),
            )  # fmt: skip
            out.seek(0)
            said = out.read().decode(errors="replace").strip()
        if proc.returncode != 0 or not self.running(name):
            said = said or tail(Path(spec["qemu_log"]), 3)
            raise HypervisorError(
                f"host '{self.host.name}': VM '{name}' did not start (exit {proc.returncode}): "
                f"{said[-400:] or 'no output'}",
                f"run {self.vm_dir / name / LAUNCH_NAME} to see it yourself",
            )
        return True

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM (QEMU shuts down cleanly on it), SIGKILL if it lingers: for tests and failovers."""
        from hotvm.guest.qemu import terminate

        spec = self.spec(name)
        if spec is not None:
            pid = read_pid(Path(spec["pidfile"]))
            if pid_alive(pid, spec["qmp"]):
                terminate(pid, spec["qmp"], grace=timeout)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the launch spec


def launch_files(definition: VMDefinition, vmdir: Path, host: str) -> dict[str, bytes]:
    """Every file of the registered VM (relative to vmdir) -> its exact content."""
    script_path, command = find_launch_command(definition)
    rewriter = _Rewriter(definition, vmdir, host)
    cmd = rewriter.rewrite(command)
    spec = {
        "name": definition.name,
        "source_vm": definition.source_vm,
        "source_driver": definition.source_driver,
        "new_identity": definition.new_identity,
        "launch_script_of_source": script_path,
        "command": cmd,
        "qmp": str(vmdir / "qmp.sock"),
        "guest_agent": rewriter.agent_socket,
        "pidfile": str(vmdir / "qemu.pid"),
        "qemu_log": str(vmdir / "qemu.log"),
        "disks": rewriter.disks,
        "uuid": rewriter.uuid,
        "warnings": rewriter.warnings,
    }
    files = {
        SPEC_NAME: (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode(),
        LAUNCH_NAME: render_script(
            cmd, f"hotvm: {definition.name} (from a backup of {definition.source_vm})"
        ).encode(),
    }
    for original, data in definition.files.items():
        files["config/" + original.lstrip("/")] = data
    files.update(rewriter.inputs)
    return files


def find_launch_command(definition: VMDefinition) -> tuple[str, list[str]]:
    """(path, argv) of the backed-up script that starts QEMU: the QEMU driver's 'VMX'."""
    for path, data in sorted(definition.files.items()):
        argv = parse_launch_script(data.decode(errors="replace"))
        if argv:
            return path, argv
    raise HotvmError(
        f"the backup of VM '{definition.source_vm}' holds no QEMU launch script "
        f"(config files: {', '.join(definition.files) or 'none'})",
        "list the script that starts the VM (qemu-system-... command) in the VM's config_files, back it "
        "up again, then register it",
    )


def parse_launch_script(text: str) -> list[str] | None:
    """argv of the first qemu-system command in a shell script (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        if "qemu-system" not in line or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if "qemu-system" in os.path.basename(word):
                return words[i:]
    return None


class _Rewriter:
    """Moves a launch command to a new home: disks, sockets, logs, name, identity, input files."""

    def __init__(self, definition: VMDefinition, vmdir: Path, host: str) -> None:
        self.d, self.vmdir, self.host = definition, vmdir, host
        self.warnings: list[str] = []
        self.inputs: dict[str, bytes] = {}
        self.agent_socket: str | None = None
        self.uuid: str | None = None
        self._qmp_count = 0
        self._agent_ids: set[str] = set()
        self._disk_map: dict[str, tuple[str, str]] = {}  # original image path -> (new path, format)
        self.disks: dict[str, str] = {}
        described = {d.get("device"): d for d in definition.description.get("disks", [])}
        for device, new in sorted(definition.disks.items()):
            original = described.get(device, {}).get("path")
            if not original:
                self.warnings.append(f"disk {device}: not in the VM description; not attached")
                continue
            self._disk_map[original] = (str(Path(new).resolve()), _image_format(Path(new)))
            self.disks[device] = str(Path(new).resolve())
        for device, disk in described.items():
            if device not in definition.disks and disk.get("path"):
                self.disks[str(device)] = disk["path"]  # shared storage: the standby uses the same file

    def rewrite(self, argv: list[str]) -> list[str]:
        self._agent_ids = {  # chardevs behind the guest agent's virtio port
            part[8:]
            for arg in argv
            if arg.startswith("virtserialport") and "name=org.qemu.guest_agent.0" in arg
            for part in _split_opts(arg)
            if part.startswith("chardev=")
        }
        out = [argv[0]]
        args = argv[1:]
        i = 0
        has_uuid = has_daemonize = False
        while i < len(args):
            opt = args[i]
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
            if opt in ("-daemonize",):
                has_daemonize = True
            if value is None:
                if opt not in ("-pidfile", "-D"):
                    out.append(opt)
                i += 1
                continue
            i += 2
            new = self._option(opt, value)
            if opt == "-uuid":
                has_uuid = True
            if new is not None:
                out += [opt, new]
        if self.d.new_identity and not has_uuid:
            self.uuid = self._new_uuid()
            out += ["-uuid", self.uuid]
        out += ["-pidfile", str(self.vmdir / "qemu.pid"), "-D", str(self.vmdir / "qemu.log")]
        if not has_daemonize:
            out.append("-daemonize")
            if "-nographic" in argv or any(a == "stdio" or a.startswith("stdio,") for a in argv):
                self.warnings.append(
                    "the backed-up command uses the terminal (stdio / -nographic), which QEMU refuses with "
                    "-daemonize: give the VM a -serial file: or socket console"
                )
        self._check_sockets(out)
        return out

    def _option(self, opt: str, value: str) -> str | None:
        """The new value of one option (None drops it)."""
        if opt in ("-pidfile", "-D"):
            return None  # re-added pointing into the new directory
        if opt == "-name":
            return self.d.name
        if opt == "-uuid":
            if self.d.new_identity:
                self.uuid = self._new_uuid()
                return self.uuid
            self.uuid = value
            return value
        if opt in ("-qmp", "-monitor", "-qmp-pretty") and value.startswith("unix:"):
            self._qmp_count += 1
            sock = "qmp.sock" if self._qmp_count == 1 else f"qmp{self._qmp_count}.sock"
            rest = value.split(",", 1)[1] if "," in value else "server=on,wait=off"
            return f"unix:{escape_opt(str(self.vmdir / sock))},{rest}"
        if opt == "-serial" and value.startswith("file:"):
            return f"file:{under(self.vmdir, os.path.basename(value[5:]), what='serial file of the VM')}"
        if opt == "-chardev":
            return self._chardev(value)
        if opt == "-blockdev":
            return self._blockdev(value)
        if opt == "-drive":
            return self._keyvals(value, "file", "format")
        if opt in _SIMPLE_DISK_OPTS:
            return self._disk_map.get(value, (value, ""))[0]
        if opt in _INPUT_OPTS:
            return self._input_file(value)
        if opt in ("-device", "-nic", "-netdev", "-net") and "mac=" in value:
            return self._macs(value)
        return value

    # ------------------------------------------------------------------ option kinds

    def _chardev(self, value: str) -> str:
        parts = _split_opts(value)
        for n, part in enumerate(parts):
            if part.startswith("path="):
                new = str(under(self.vmdir, os.path.basename(part[5:]), what="chardev path of the VM"))
                parts[n] = "path=" + escape_opt(new)
                if any(p.startswith("id=") and p[3:] in self._agent_ids for p in parts):
                    self.agent_socket = new
        return ",".join(parts)

    def _blockdev(self, value: str) -> str:
        if not value.lstrip().startswith("{"):
            return self._keyvals(value, "file.filename", "driver")
        node = json.loads(value)
        self._map_json(node)
        return json.dumps(node, separators=(",", ":"))

    def _map_json(self, node: dict) -> bool:
        """Rewrite a mapped file name inside a blockdev tree; the format node above it takes the new
        image's format. Returns True when this node was the protocol node of a mapped disk."""
        child = node.get("file")
        if isinstance(child, dict) and self._map_json(child):
            fmt = self._disk_map_by_new(child.get("filename", ""))
            if fmt:
                node["driver"] = fmt
            return False
        filename = node.get("filename")
        if isinstance(filename, str) and filename in self._disk_map:
            node["filename"] = self._disk_map[filename][0]
            return True
        return False

    def _disk_map_by_new(self, path: str) -> str:
        return next((fmt for new, fmt in self._disk_map.values() if new == path), "")

    def _keyvals(self, value: str, file_key: str, fmt_key: str) -> str:
        parts = _split_opts(value)
        mapped = None
        for n, part in enumerate(parts):
            key, _, val = part.partition("=")
            if key == file_key and val.replace(",,", ",") in self._disk_map:
                mapped = self._disk_map[val.replace(",,", ",")]
                parts[n] = f"{key}={escape_opt(mapped[0])}"
        if mapped is not None:
            parts = [p for p in parts if not p.startswith(f"{fmt_key}=")] + [f"{fmt_key}={mapped[1]}"]
        return ",".join(parts)

    def _input_file(self, value: str) -> str:
        data = self.d.files.get(value)
        if data is not None:
            rel = f"files/{component(os.path.basename(value), 'input file of the launch command')}"
            self.inputs[rel] = data
            return str(self.vmdir / rel)
        if not Path(value).exists():
            self.warnings.append(f"{value} is not in the backup and not on this machine: copy it there")
        return value

    def _macs(self, value: str) -> str:
        if not self.d.new_identity:
            return value
        parts = _split_opts(value)
        for n, part in enumerate(parts):
            if part.startswith("mac="):
                parts[n] = "mac=" + self._new_mac(part[4:])
        return ",".join(parts)

    # ------------------------------------------------------------------ identity (stable per host+name)

    def _seed(self, extra: str) -> bytes:
        return hashlib.sha256(f"hotvm:{self.host}:{self.d.name}:{extra}".encode()).digest()

    def _new_uuid(self) -> str:
        return str(uuid.UUID(bytes=self._seed("uuid")[:16], version=4))

    def _new_mac(self, old: str) -> str:
        """Locally administered, unicast; the same copy gets the same MAC on every rerun."""
        tail = self._seed("mac:" + old)[:3]
        return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)

    def _check_sockets(self, argv: list[str]) -> None:
        for path in (self.vmdir / "qmp.sock", self.vmdir / "qga.sock"):
            if len(str(path)) > UNIX_PATH_MAX:
                raise ConfigError(
                    f"{path} is too long for a unix socket ({len(str(path))} > {UNIX_PATH_MAX})",
                    f"use a shorter vm_dir for host '{self.host}' or a shorter VM name",
                )


def _split_opts(value: str) -> list[str]:
    """QEMU's a=b,c=d with ',,' as an escaped comma."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur += ",,"
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    return parts


def _image_format(path: Path) -> str:
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )
    if proc.returncode != 0:
        raise HotvmError(f"cannot read restored disk {path}: {proc.stderr.strip()}", "restore it again")
    return json.loads(proc.stdout)["format"]
