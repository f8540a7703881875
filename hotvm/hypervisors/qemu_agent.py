"""A small client for the QEMU guest agent (qemu-ga): just enough to freeze and thaw guest file systems.

Not `qemu.qmp`: the agent speaks QMP's JSON but has no greeting or capabilities negotiation, and a
restarted agent may still have half an old reply in the channel. The documented cure is the
`guest-sync-delimited` handshake: the agent sends 0xFF first, then echoes our random id, so everything
before that 0xFF is stale. One short connection per call, a timeout on every read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hotvm.config import HostConfig, VMConfig
from hotvm.errors import ConfigError, HypervisorError

log = logging.getLogger("hotvm.qemu")

SYNC_TIMEOUT_S = 10.0
FREEZE_TIMEOUT_S = 60.0
"""Windows VSS gives writers 60 s too; a guest that needs longer to flush is failed, not waited on."""
THAW_TIMEOUT_S = 30.0
START_HINT = (
    "start QEMU with -chardev socket,path={path},server=on,wait=off,id=qga0 -device virtio-serial "
    "-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 and run qemu-ga in the guest"
)


class GuestAgentError(HypervisorError):
    """The guest agent is unreachable, timed out, or answered with an error."""


class GuestAgent:
    """One connection to a guest agent socket (a context manager; `close()` frees the channel)."""

    def __init__(self, path: Path, vm: str) -> None:
        self.path, self.vm = Path(path), vm
        self._sock: socket.socket | None = None
        self._buf = b""

    def _fail(self, why: str, hint: str = "") -> GuestAgentError:
        return GuestAgentError(
            f"VM '{self.vm}': guest agent at {self.path}: {why}", hint or START_HINT.format(path=self.path)
        )

    # ------------------------------------------------------------------ connection

    def connect(self, timeout: float = SYNC_TIMEOUT_S) -> None:
        if not self.path.exists():
            raise self._fail("the socket does not exist")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise self._fail(f"cannot connect ({exc.strerror or exc})") from None
        self._sock, self._buf = sock, b""
        self._sync(timeout)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> GuestAgent:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sync(self, timeout: float) -> None:
        """guest-sync-delimited: drop whatever precedes the agent's 0xFF, then expect our id back."""
        sync_id = random.randint(1, 2**31 - 1)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        deadline = time.monotonic() + timeout
        while b"\xff" not in self._buf:
            self._recv_more(deadline, "the sync handshake")
        self._buf = self._buf[self._buf.rindex(b"\xff") + 1 :]
        while True:
            reply = self._read_reply(deadline, "the sync handshake")
            if reply.get("return") == sync_id:
                return
            log.debug("guest agent %s: dropping stale reply %s", self.path, reply)

    # ------------------------------------------------------------------ commands

    def execute(self, command: str, arguments: dict | None = None, timeout: float = SYNC_TIMEOUT_S) -> Any:
        if self._sock is None:
            self.connect()
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._read_reply(time.monotonic() + timeout, command)
        if "error" in reply:
            err = reply["error"]
            raise self._fail(f"{command} failed: {err.get('desc', err)}", "see the guest's qemu-ga log")
        return reply.get("return")

    def fsfreeze_status(self) -> str:
        """'thawed' or 'frozen'."""
        return str(self.execute("guest-fsfreeze-status"))

    def freeze(self, timeout: float = FREEZE_TIMEOUT_S) -> int:
        """Freeze every guest file system (flushes first); returns how many were frozen."""
        return int(self.execute("guest-fsfreeze-freeze", timeout=timeout))

    def thaw(self, timeout: float = THAW_TIMEOUT_S) -> int:
        return int(self.execute("guest-fsfreeze-thaw", timeout=timeout))

    # ------------------------------------------------------------------ wire

    def _send(self, msg: dict) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            self.close()
            raise self._fail(f"connection lost ({exc.strerror or exc})") from None

    def _recv_more(self, deadline: float, what: str) -> None:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise self._fail(f"no answer to {what} within the timeout", _timeout_hint(self.path))
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            self.close()
            raise self._fail(f"no answer to {what} within the timeout", _timeout_hint(self.path)) from None
        except OSError as exc:
            self.close()
            raise self._fail(f"connection lost during {what} ({exc.strerror or exc})") from None
        if not data:
            self.close()
            raise self._fail(f"the agent closed the connection during {what}")
        self._buf += data

    def _read_reply(self, deadline: float, what: str) -> dict:
        """Next JSON object on the channel (replies are one per line; a stray 0xFF is skipped)."""
        while True:
            self._buf = self._buf.lstrip(b"\xff \r\n")
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    reply = json.loads(line.replace(b"\xff", b""))
                except ValueError:
                    log.debug("guest agent %s: unparsable line %r", self.path, line[:200])
                    continue
                if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                    return reply
                continue
            self._recv_more(deadline, what)


def _timeout_hint(path: Path) -> str:
    return (
        f"is qemu-ga running in the guest and connected to {path}? (a paused or hung guest cannot "
        "answer); turn quiesce off in the VM's policy to take crash-consistent backups meanwhile"
    )


@contextlib.contextmanager
def frozen_filesystems(
    path: Path,
    vm: str,
    freeze_timeout: float = FREEZE_TIMEOUT_S,
    thaw_timeout: float = THAW_TIMEOUT_S,
    sync_timeout: float = SYNC_TIMEOUT_S,
) -> Iterator[int]:
    """Guest file systems frozen for the body of the `with`; thawed afterwards whatever happened.

    A freeze that fails or times out is thawed too (the agent may have frozen some file systems before
    it gave up), then the freeze error is raised. A failed thaw after a successful body is an error:
    a guest left frozen stops every application in it."""
    agent = GuestAgent(path, vm)
    try:
        agent.connect(sync_timeout)
        started = time.perf_counter()
        try:
            count = agent.freeze(freeze_timeout)
        except GuestAgentError as exc:
            _thaw_after_failure(path, vm, thaw_timeout)
            raise GuestAgentError(
                f"{exc.message} (quiesce: freezing the guest file systems failed; thaw attempted)", exc.hint
            ) from None
        log.info("VM '%s': %d guest file system(s) frozen in %.0f ms", vm, count,
                 (time.perf_counter() - started) * 1000)  # fmt: skip
        try:
            yield count
        except BaseException as failure:
            if not _thaw(agent, path, vm, thaw_timeout):
                raise GuestAgentError(
                    f"VM '{vm}': the guest file systems could not be thawed after a failure ({failure})",
                    "thaw them now (guest-fsfreeze-thaw through the agent), or reboot the guest",
                ) from failure
            raise
        if not _thaw(agent, path, vm, thaw_timeout):
            raise GuestAgentError(
                f"VM '{vm}': the guest file systems could not be thawed (agent {path})",
                "thaw them now: guest-fsfreeze-thaw through the agent, or reboot the guest",
            )
        log.info("VM '%s': guest file systems thawed after %.0f ms frozen", vm,
                 (time.perf_counter() - started) * 1000)  # fmt: skip
    finally:
        agent.close()


def _thaw(agent: GuestAgent, path: Path, vm: str, timeout: float) -> bool:
    """Thaw on the open connection, else once more on a fresh one; True when the agent confirmed it."""
    try:
        agent.thaw(timeout)
        return True
    except GuestAgentError as exc:
        log.warning("VM '%s': thaw failed (%s); retrying on a new connection", vm, exc.message)
    return _thaw_after_failure(path, vm, timeout)


def _thaw_after_failure(path: Path, vm: str, timeout: float) -> bool:
    """Best effort, on a fresh connection (the old one may hold a late reply)."""
    try:
        with GuestAgent(path, vm) as agent:
            agent.thaw(timeout)
        return True
    except GuestAgentError as exc:
        log.error("VM '%s': thawing the guest file systems failed: %s", vm, exc.message)
        return False


def check_quiesce_possible(host: HostConfig, vm: VMConfig, policy: str) -> None:
    """Refuse a quiescing policy up front (plan time) when the QEMU driver has no agent socket to use.

    libvirt (its own agent channel) and vSphere (VMware Tools) find their agent themselves."""
    if host.driver == "qemu" and vm.guest_agent is None:
        raise ConfigError(
            f"VM '{vm.name}': policy '{policy}' has quiesce: true but the VM has no guest_agent socket",
            f"add guest_agent: /path/to/qga.sock to VM '{vm.name}' in hotvm.yaml (QEMU: -chardev socket,"
            "path=...,server=on,wait=off,id=qga0 -device virtio-serial -device virtserialport,chardev=qga0,"
            "name=org.qemu.guest_agent.0, and qemu-ga running in the guest), or set quiesce: false",
        )


__all__ = [
    "FREEZE_TIMEOUT_S",
    "GuestAgent",
    "GuestAgentError",
    "check_quiesce_possible",
    "frozen_filesystems",
]
