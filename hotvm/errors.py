"""One exception hierarchy so the CLI and flows can turn any failure into one clear line.

Every error carries a `hint`: what the user should do next. Subpackages raise the narrowest class.
"""

from __future__ import annotations


class HotvmError(Exception):
    """Base of every error hotvm raises on purpose; `str()` is the one-line message shown to the user."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message

    def __reduce__(self):  # survive pickling (Prefect persists task failures)
        return (self.__class__, (self.message, self.hint))


class ConfigError(HotvmError):
    """hotvm.yaml is missing, unreadable or invalid, or names something that does not exist."""


class UnknownVMError(ConfigError):
    pass


class UnknownTargetError(ConfigError):
    pass


class HypervisorError(HotvmError):
    """The hypervisor refused or failed an operation."""


class HypervisorUnreachable(HypervisorError):
    """The VM's control socket / API cannot be reached."""


class VMNotRunning(HypervisorUnreachable):
    """Nothing listens on the VM's control socket: retrying in a few seconds will not help."""


class DiskNotSupported(HypervisorError):
    """A disk cannot take an overlay (read-only, snapshot=on, ...)."""


class BlockJobError(HypervisorError):
    """A block job (commit) failed, paused on error or did not finish in time."""


class TargetError(HotvmError):
    """The backup target cannot be read or written."""


class TargetFull(TargetError):
    pass


class TargetConfigError(TargetError, ConfigError):
    """A target problem that retrying cannot fix (credentials, host key, no such share or bucket)."""


class BackupSetError(HotvmError):
    """A backup set is missing, incomplete or corrupt."""


class ChecksumMismatch(BackupSetError):
    pass


class TamperedBlob(ChecksumMismatch):
    """A file on a target is not what hotvm stores there: larger than its format allows, or (file://) not
    a regular file (a symlink, a device, a FIFO). Refused before it is read or allocated: damage, not data."""


class RunFailed(HotvmError):
    """A run over many VMs had failures; `results` holds every VM's result, for the report."""

    def __init__(self, message: str, hint: str = "", results: list[dict] | None = None) -> None:
        super().__init__(message, hint)
        self.results = results or []

    def __reduce__(self):  # survive pickling with the report
        return (self.__class__, (self.message, self.hint, self.results))
