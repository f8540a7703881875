"""Ends a process when the one that started it dies, however it dies (SIGKILL included).

    python -m hotvm.watchdog PIDFD

Started with the pidfd of the process to guard (passed as an inherited file descriptor, so a reused pid
can never be hit) and a pipe on stdin whose only writer is the parent. The kernel closes that pipe when
the parent dies; on EOF the guarded process gets SIGTERM, then SIGKILL if it is still there 10 s later.
Used for Prefect's embedded server, which would otherwise outlive a killed CLI (~200 MB each).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

GRACE_S = 10.0


def guard(process: subprocess.Popen) -> subprocess.Popen:
    """Start a watchdog that ends `process` (a child of ours, not yet reaped) when this process dies."""
    from hotvm.child_env import child_env

    pidfd = os.pidfd_open(process.pid)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "hotvm.watchdog", str(pidfd)],
            stdin=subprocess.PIPE,  # its write end stays here: closed by the kernel when we die
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for us must not end it before it has done its job
            pass_fds=(pidfd,),
            env=child_env(),
        )
    finally:
        os.close(pidfd)


def _wait_exit(pidfd: int, seconds: float) -> bool:
    """True once the process behind `pidfd` has exited (a pidfd turns readable then)."""
    return bool(select.select([pidfd], [], [], seconds)[0])


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pidfd = int(argv[0])
    while sys.stdin.buffer.read(4096):
        pass  # the parent never writes; EOF means it is gone
    if _wait_exit(pidfd, 0):
        return 0
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not _wait_exit(pidfd, GRACE_S):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
