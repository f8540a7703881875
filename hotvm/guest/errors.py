"""Errors of the demo guest, so the CLI can print one line and a next step like for every other failure."""

from __future__ import annotations

from hotvm.errors import HotvmError


class GuestError(HotvmError):
    """Building, starting, stopping or checking a demo VM failed."""


class VMExists(GuestError):
    pass


class VMNotFound(GuestError):
    pass


class VMAlreadyRunning(GuestError):
    pass


class VMNotRunning(GuestError):
    """QEMU is not running (never started, stopped, or died: see the hint for its last words)."""


class BootTimeout(GuestError):
    """The guest did not print the awaited line in time."""


class ImageUnreadable(GuestError):
    """A disk image could not be read (missing, wrong format, or locked by a running QEMU)."""
