"""What this host remembers about each repository it has used (like borg's security directory).

A target is untrusted: its marker (hotvm-repository.json) can vanish (an unmounted share shows an empty
mount point), be replaced by another repository's, or lose its encryption entry. The marker alone cannot
tell. So the first time hotvm opens a repository at a location it records the repository's id and its
encryption (salt, key check) here, and every later open compares: a vanished, swapped or downgraded
repository is refused with a message naming the target, never silently re-created or read as plain.

    $HOTVM_SECURITY_DIR                         if set (tests; several hotvm users sharing one store)
    /var/lib/hotvm/security                     when run as root
    ${XDG_CONFIG_HOME:-~/.config}/hotvm/security otherwise
      <sha256(location)[:32]>.json              {"location", "target", "id", "encrypted", "salt", "check"}

`hotvm target forget NAME` removes a target's entry (after re-creating a repository on purpose).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

SECURITY_ENV = "HOTVM_SECURITY_DIR"


def security_dir() -> Path:
    if os.environ.get(SECURITY_ENV):
        return Path(os.environ[SECURITY_ENV])
    if os.geteuid() == 0:
        return Path("/var/lib/hotvm/security")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hotvm" / "security"


def location_of(url: str, endpoint_url: str | None = None) -> str:
    """The key a target's identity is remembered under: its URL without password or trailing '/' (a path
    is a file:// URL), and the S3 endpoint if one is set (one bucket name at two services is two places),
    so two configured names for one place share it and one name moved elsewhere does not."""
    from targets.base import redact_url

    location = redact_url(url if "://" in url else f"file://{url}").rstrip("/")
    return f"{location} at {redact_url(endpoint_url).rstrip('/')}" if endpoint_url else location


def marker_id(meta: dict) -> str:
    """The repository's id: the marker's random `id`, or for a marker written before ids existed a
    digest of the whole marker (markers never change once written)."""
    value = meta.get("id")
    if isinstance(value, str) and value:
        return value
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return "marker-sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    location: str
    target: str
    id: str
    encrypted: bool
    salt: str | None = None
    check: str | None = None

    @classmethod
    def of_marker(cls, location: str, target: str, meta: dict) -> Identity:
        entry = meta.get("encryption")
        if isinstance(entry, dict):
            salt, check = str(entry.get("salt")), str(entry.get("check"))
            return cls(location, target, marker_id(meta), True, salt, check)
        return cls(location, target, marker_id(meta), False)

    def differences(self, other: Identity) -> list[str]:
        """What changed from this (remembered) identity to `other` (the marker now on the target)."""
        out = []
        if self.encrypted and not other.encrypted:
            out.append("it lost its encryption")
        elif other.encrypted and not self.encrypted:
            out.append("it is encrypted now and was not")
        elif self.encrypted and (self.salt, self.check) != (other.salt, other.check):
            out.append("its encryption salt/key check changed")
        if self.id != other.id:
            out.append(f"its id changed ({self.id[:24]} -> {other.id[:24]})")
        return out


class IdentityStore:
    """Remembered identities, one 0600 file per target location."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or security_dir()

    def path(self, location: str) -> Path:
        return self.directory / f"{hashlib.sha256(location.encode()).hexdigest()[:32]}.json"

    def get(self, location: str) -> Identity | None:
        try:
            body = json.loads(self.path(location).read_text())
            return Identity(**body)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            from hotvm.errors import HotvmError

            raise HotvmError(
                f"the remembered identity of {location} ({self.path(location)}) is unreadable: {exc}",
                "remove that file (hotvm target forget NAME) if you trust the target as it is now",
            ) from None

    def remember(self, identity: Identity) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.path(identity.location)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(identity), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def forget(self, location: str) -> bool:
        try:
            self.path(location).unlink()
        except FileNotFoundError:
            return False
        return True

    @contextmanager
    def creating(self, location: str) -> Iterator[None]:
        """Serialise first use of one location on this host: two first backups starting together must
        not each create (and remember) their own repository."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path(location).with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
