"""Run the hotvm CLI held at one point of its run, for tests that must SIGKILL it exactly there.

    python tests/pausepoint.py NAME FIFO hotvm-arguments...

runs `python -m hotvm hotvm-arguments...` in which, the first time a file:// target opens a blob named NAME,
the process first reads FIFO (which the test opens for writing and never writes to: helpers.blocked_reading).
The run then waits there, after everything before that read and before anything after it, however fast or
loaded the machine; when the test closes its end, the read sees EOF and the run goes on. Only this child is
held, and only there: everything it runs is the real product (a blob that is itself a FIFO would be refused
as tampered with, targets/local.py).
"""

from __future__ import annotations

import os
import runpy
import sys


def hold_before_opening(name: str, fifo: str) -> None:
    import targets.local as local

    opener = local.LocalTarget._open_blob
    held = False

    def _open_blob(self: local.LocalTarget, path: str, limit: int) -> tuple[int, int]:
        nonlocal held
        if not held and os.path.basename(path) == name:
            held = True
            with open(fifo, "rb") as waiting:
                waiting.read()
        return opener(self, path, limit)

    local.LocalTarget._open_blob = _open_blob  # type: ignore[method-assign]


if __name__ == "__main__":
    hold_before_opening(sys.argv[1], sys.argv[2])
    sys.argv = ["hotvm", *sys.argv[3:]]
    runpy.run_module("hotvm", run_name="__main__", alter_sys=True)
