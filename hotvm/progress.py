"""A process-wide progress listener, so the CLI can draw bars for work running inside Prefect tasks."""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str, str, int, int], None]
"""listener(activity, item, done, total), e.g. ("export", "web01/data", 512 MiB, 2 GiB)."""

_listener: Listener | None = None


def set_listener(listener: Listener | None) -> None:
    global _listener
    _listener = listener


def emit(activity: str, item: str, done: int, total: int) -> None:
    if _listener is not None:
        _listener(activity, item, done, total)
