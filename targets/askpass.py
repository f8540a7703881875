"""Hands a password (or a key's passphrase) to the `ssh` children of one target, and to nothing else.

OpenSSH reads passwords only from a terminal or from an SSH_ASKPASS program, never from its environment or
stdin (stdin carries the SFTP session here). So each target that has a password runs this: a unix socket in
a private 0700 directory and a tiny askpass program beside it (SSH_ASKPASS_REQUIRE=force). ssh runs the
program with its prompt; the program asks the socket; the socket answers only a process whose parent is one
of the ssh processes this target started (SO_PEERCRED), and only a password or passphrase prompt.
The secret is never in a file, an argument or an environment variable (docs/security.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
from contextlib import suppress
from pathlib import Path

_PROGRAM = """#!{python} -I
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect({socket!r})
s.sendall(" ".join(sys.argv[1:]).encode("utf-8", "replace")[:1024] + b"\\n")
reply = b""
while chunk := s.recv(4096):
    reply += chunk
if not reply.startswith(b"+"):
    sys.exit(1)
sys.stdout.buffer.write(reply[1:] + b"\\n")
"""
_ANSWERED = ("password", "passphrase")
"""Prompts that are answered: "user@host's password:", "Password:" (keyboard-interactive), "Enter passphrase
for key ...". Anything else (a confirmation, a PIN) gets a refusal."""


def _python() -> str:
    """This interpreter, or python3 from PATH where hotvm runs embedded (instant restore's nbdkit plugin)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or "/usr/bin/python3"


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Askpass:
    """The socket and program for one secret; `env()` is what an ssh child needs, `allow(pid)` admits it."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._dir = Path(tempfile.mkdtemp(prefix="hotvm-askpass-"))  # mkdtemp: 0700, ours
        self._path = str(self._dir / "s")
        self.program = self._dir / "askpass"
        self.program.write_text(_PROGRAM.format(python=_python(), socket=self._path))
        self.program.chmod(0o700)
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(self._path)
        self._sock.listen(8)
        self._ssh: set[int] = set()
        self.lock = threading.RLock()
        """Held while an ssh child is started and allowed: its askpass request waits for allow()."""
        self._thread = threading.Thread(target=self._serve, name="hotvm-askpass", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        return {"SSH_ASKPASS": str(self.program), "SSH_ASKPASS_REQUIRE": "force"}

    def allow(self, pid: int) -> None:
        with self.lock:
            self._ssh.add(pid)

    def forget(self, pid: int) -> None:
        with self.lock:
            self._ssh.discard(pid)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn, suppress(OSError):
                conn.settimeout(5)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid, uid, _gid = struct.unpack("3i", creds)
                prompt = conn.recv(1024).decode("utf-8", "replace").lower()
                with self.lock:
                    ours = _parent_of(pid) in self._ssh
                if ours and uid == os.getuid() and any(word in prompt for word in _ANSWERED):
                    conn.sendall(b"+" + self._secret)
                else:
                    conn.sendall(b"-")

    def close(self) -> None:
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)
