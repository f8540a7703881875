"""A small synchronous QMP client with timeouts everywhere.

`qemu.qmp` is asyncio-only (its legacy shim has no connect timeout and runs the loop in the caller's
thread), so we drive a private event loop in a daemon thread: callable from plain code, from Prefect's
worker threads and from inside a running event loop alike, and no call can hang past its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from hotvm.errors import HypervisorError, HypervisorUnreachable, VMNotRunning

log = logging.getLogger("hotvm.qemu")

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 120.0
START_HINT = "is the VM running? it must be started with -qmp unix:{path},server=on,wait=off"


class QmpCommandError(HypervisorError):
    """QEMU answered a command with an error (the QMP error class is kept for callers that branch on it)."""

    def __init__(self, message: str, hint: str = "", error_class: str = "") -> None:
        super().__init__(message, hint)
        self.error_class = error_class


class Monitor:
    """One QMP connection to one VM; `close()` releases the socket for the next client."""

    def __init__(
        self,
        path: Path,
        vm_name: str,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        command_timeout: float = COMMAND_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.vm_name = vm_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: QMPClient | None = None
        self.events: deque[dict] = deque(maxlen=512)
        """Recent QMP events (collected with each command's reply), for their QEMU-side timestamps."""

    # ------------------------------------------------------------------ plumbing

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        return future.result(timeout + 5)

    def _unreachable(
        self, why: str, cls: type[HypervisorUnreachable] = HypervisorUnreachable
    ) -> HypervisorUnreachable:
        return cls(
            f"VM '{self.vm_name}': cannot talk to QMP socket {self.path}: {why}",
            START_HINT.format(path=self.path),
        )

    @property
    def connected(self) -> bool:
        return self._client is not None

    def connect(self) -> None:
        if self._client is not None:
            return
        if not self.path.exists():
            raise self._unreachable("the socket does not exist", VMNotRunning)
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name=f"qmp-{self.vm_name}", daemon=True
            )
            self._thread.start()

        async def _open() -> QMPClient:
            client = QMPClient(self.vm_name)
            try:
                await client.connect(str(self.path))
            except BaseException:
                await client.disconnect()
                raise
            return client

        try:
            self._client = self._run(_open(), self.connect_timeout)
        except TimeoutError:
            raise self._unreachable(
                f"no QMP greeting within {self.connect_timeout:g}s "
                "(is another client, e.g. libvirt or another hotvm run, connected? QMP serves one at a time)"
            ) from None
        except (ConnectError, OSError, QMPError, EOFError) as exc:
            cause = getattr(exc, "exc", None) or exc
            cls = VMNotRunning if isinstance(cause, ConnectionRefusedError) else HypervisorUnreachable
            raise self._unreachable(str(cause), cls) from None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is not None:
            try:
                self._run(client.disconnect(), 5)
            except Exception as exc:  # the peer may already be gone; we are letting go anyway
                log.debug("QMP disconnect from %s: %s", self.path, exc)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop.close()
        self._loop = self._thread = None

    # ------------------------------------------------------------------ commands

    def event_time(self, name: str, **data: object) -> float | None:
        """QEMU's own wall-clock timestamp of the latest event `name` whose data match, if seen."""
        for event in reversed(self.events):
            if event.get("event") == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                stamp = event.get("timestamp", {})
                return stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
        return None

    def cmd(
        self, name: str, args: dict | None = None, *, timeout: float | None = None, retry: bool = False
    ) -> Any:
        """Run one command. `retry` (only for read-only queries) reconnects once if the link dropped."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            self.connect()
            assert self._client is not None
            try:
                result, events = self._run(
                    _execute(self._client, name, args), timeout or self.command_timeout
                )
                self.events.extend(dict(e) for e in events)
                return result
            except ExecuteError as exc:
                raise QmpCommandError(
                    f"VM '{self.vm_name}': QEMU refused {name}: {exc}", error_class=exc.error_class
                ) from None
            except TimeoutError:
                self.close()
                raise self._unreachable(
                    f"{name} got no answer within {timeout or self.command_timeout:g}s"
                ) from None
            except (QMPError, OSError, EOFError) as exc:
                self.close()
                if attempt + 1 == attempts:
                    raise self._unreachable(f"connection lost during {name}: {exc}") from None
                log.info("QMP connection to %s lost (%s); reconnecting", self.path, exc)
        raise AssertionError("unreachable")


async def _execute(client: QMPClient, name: str, args: dict | None) -> tuple[Any, list]:
    result = await client.execute(name, args or None)
    return result, client.events.clear()  # state is polled; events are kept only for their timestamps
