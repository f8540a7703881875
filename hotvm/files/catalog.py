r"""The catalog: every file of every backup, in SQLite, for fast find / ls (the seed's "detailed catalog").

One cache file per repository (under $HOTVM_CATALOG_DIR, default ~/.cache/hotvm/catalog): it is derived
data, never the truth. On every use it is synced with the target (sets not indexed yet are indexed, sets
gone from the target are dropped), and `hotvm files catalog --rebuild` recreates it from the sets alone.
Paths are '/<volume key>/<path in the volume>', e.g. '/vda-p1/home/ann/sales.xls': one tree per VM, the
volumes at its top. Name searches use the index on `name` (a pattern with a literal prefix is a range
scan; '*.xls' is a scan of the name column, still well under a second for a million entries).

Names are bytes in a guest (held as surrogateescape str elsewhere in hotvm); the catalog stores and shows
them as hotvm.safepath.printable text (bytes that are not UTF-8 and control characters as \xNN, a
backslash as \\), so any name is stored and searchable; restore works on the set's own entries and
gets the exact bytes back. The catalog is private to the backup host: its directory 0700, its files 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from hotvm.formats.repository import Repository, safe_name
from hotvm.safepath import printable

CATALOG_DIR_ENV = "HOTVM_CATALOG_DIR"
SCHEMA_VERSION = 2
"""2: names stored as printable text (1 could not hold a name that is not UTF-8)."""
COLUMNS = (
    "path", "name", "parent", "kind", "size", "mode", "uid", "gid", "mtime_ns", "atime_ns", "ctime_ns",
    "inode", "nlink", "target", "link", "content",
)  # fmt: skip


def catalog_dir() -> Path:
    if os.environ.get(CATALOG_DIR_ENV):
        return Path(os.environ[CATALOG_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hotvm" / "catalog"


def catalog_path(repo: Repository) -> Path:
    url = repo.target.display()
    return (
        catalog_dir()
        / f"{safe_name(repo.target.name)}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.sqlite"
    )


def remove_catalog(repo: Repository) -> Path:
    """Delete the local catalog of `repo` (with SQLite's side files): the next sync rebuilds it from the
    backup sets alone. Returns its path."""
    path = catalog_path(repo)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a catalog path; the root's parent is ''."""
    if path == "/":
        return "", "/"
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name


def _private(path: Path) -> None:
    """The catalog's directory 0700 and its database 0600 before SQLite opens it (its -wal and -shm
    files take the database's mode): it lists every file name of every guest."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.environ.get(CATALOG_DIR_ENV):  # our own directory (one named by the user is left as it is)
        os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


def _text(value: str | None) -> str | None:
    return None if value is None else printable(value)


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        _private(path)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._schema()

    @classmethod
    def for_repository(cls, repo: Repository) -> Catalog:
        return cls(catalog_path(repo))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            self.db.executescript("DROP TABLE IF EXISTS entries; DROP TABLE IF EXISTS sets;")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS sets (
                id INTEGER PRIMARY KEY, vm TEXT NOT NULL, backup_id TEXT NOT NULL, kind TEXT NOT NULL,
                completed_at TEXT NOT NULL, UNIQUE (vm, backup_id));
            CREATE TABLE IF NOT EXISTS entries (
                set_id INTEGER NOT NULL, path TEXT NOT NULL, name TEXT NOT NULL, parent TEXT NOT NULL,
                kind TEXT NOT NULL, size INTEGER, mode INTEGER, uid INTEGER, gid INTEGER, mtime_ns INTEGER,
                atime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, nlink INTEGER, target TEXT, link TEXT,
                content TEXT);
            CREATE INDEX IF NOT EXISTS entries_name ON entries (name);
            CREATE INDEX IF NOT EXISTS entries_path ON entries (path);
            CREATE INDEX IF NOT EXISTS entries_parent ON entries (set_id, parent);
            """
        )
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---- writing
    def has_set(self, vm: str, backup_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM sets WHERE vm=? AND backup_id=?", (vm, backup_id)).fetchone()
        return row is not None

    def index_set(
        self,
        vm: str,
        backup_id: str,
        kind: str,
        completed_at: dt.datetime,
        volumes: Iterable[tuple[str, list[dict]]],
    ) -> int:
        """Index one set (replacing an earlier index of it); `volumes`: (volume key, its entries)."""
        with self.db:
            self.drop_set(vm, backup_id)
            cur = self.db.execute(
                "INSERT INTO sets (vm, backup_id, kind, completed_at) VALUES (?,?,?,?)",
                (vm, backup_id, kind, completed_at.isoformat()),
            )
            set_id = cur.lastrowid
            count = 0
            for key, entries in volumes:
                key = printable(key)
                rows = [(set_id, f"/{key}", key, "/", "dir", 0, 0o755, 0, 0, 0, 0, 0, 0, 1, None, None, None)]
                for e in entries:
                    full = f"/{key}{printable(e['path'])}"
                    parent, name = split(full)
                    rows.append(
                        (set_id, full, name, parent, e["kind"], e["size"], e["mode"], e["uid"], e["gid"],
                         e["mtime_ns"], e["atime_ns"], e["ctime_ns"], e["inode"], e["nlink"],
                         _text(e.get("target")), _text(e.get("link")), e.get("content"))
                    )  # fmt: skip
                self.db.executemany(f"INSERT INTO entries VALUES (?,{','.join('?' * len(COLUMNS))})", rows)
                count += len(rows)
        return count

    def drop_set(self, vm: str, backup_id: str) -> None:
        row = self.db.execute("SELECT id FROM sets WHERE vm=? AND backup_id=?", (vm, backup_id)).fetchone()
        if row:
            self.db.execute("DELETE FROM entries WHERE set_id=?", (row[0],))
            self.db.execute("DELETE FROM sets WHERE id=?", (row[0],))

    # ---- reading
    def entry_count(self) -> int:
        """How many entries (files, directories, links) the catalog holds over all its sets."""
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def sets(self, vm: str | None = None) -> list[dict]:
        sql = "SELECT id, vm, backup_id, kind, completed_at FROM sets"
        rows = self.db.execute(
            sql + (" WHERE vm=?" if vm else "") + " ORDER BY completed_at", (vm,) if vm else ()
        )
        return [dict(zip(("id", "vm", "backup_id", "kind", "completed_at"), r, strict=True)) for r in rows]

    def find(
        self, vm: str | None, pattern: str, at: dt.datetime | None = None, limit: int = 10000
    ) -> list[dict]:
        """Every version of every entry whose name (or, with a '/', whole path) matches the glob.

        The sets are looked up first (a few rows) and joined in Python: a join per matching entry costs
        more than the whole scan of a million names."""
        sets = {
            s["id"]: (s["vm"], s["backup_id"], s["kind"], s["completed_at"])
            for s in self.sets(vm)
            if at is None or s["completed_at"] <= at.isoformat()
        }
        if not sets:
            return []
        column = "path" if "/" in pattern else "name"
        sql = f"SELECT rowid, set_id, path FROM entries WHERE {column} GLOB ?"
        found = [r for r in self.db.execute(sql, (pattern,)) if r[1] in sets]
        found.sort(key=lambda r: (r[2], sets[r[1]][3]))  # path, then time: each file's versions in order
        keys = ("vm", "backup_id", "set_kind", "completed_at", *COLUMNS)
        rows = []
        wanted = [r[0] for r in found[:limit]]
        for start in range(0, len(wanted), 500):  # the full rows of only what is returned
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            full = {
                r[0]: r[1:]
                for r in self.db.execute(
                    f"SELECT rowid, set_id, {', '.join(COLUMNS)} FROM entries WHERE rowid IN ({marks})", batch
                )
            }
            rows += [dict(zip(keys, (*sets[full[i][0]], *full[i][1:]), strict=True)) for i in batch]
        return rows

    def ls(self, vm: str, backup_id: str, path: str = "/") -> list[dict]:
        """The entry at `path` if it is not a directory, else its children. `path` as the shell passed it
        (raw bytes of a name) or as the catalog shows it (printable)."""
        row = self.db.execute("SELECT id FROM sets WHERE vm=? AND backup_id=?", (vm, backup_id)).fetchone()
        if row is None:
            return []
        path = "/" + path.strip("/") if path.strip("/") else "/"
        shown = printable(path)
        if (
            shown != path
            and self.db.execute("SELECT 1 FROM entries WHERE set_id=? AND path=?", (row[0], shown)).fetchone()
        ):
            path = shown
        cols = ", ".join("e." + c for c in COLUMNS)
        head = f"SELECT s.vm, s.backup_id, s.kind, s.completed_at, {cols} FROM entries e "
        head += "JOIN sets s ON s.id = e.set_id"
        own = self.db.execute(f"{head} WHERE e.set_id=? AND e.path=?", (row[0], path)).fetchone()
        if own is not None and own[7] != "dir":
            return [self._row(own)]
        rows = self.db.execute(f"{head} WHERE e.set_id=? AND e.parent=? ORDER BY e.name", (row[0], path))
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(r: tuple) -> dict:
        return dict(zip(("vm", "backup_id", "set_kind", "completed_at", *COLUMNS), r, strict=True))
