"""`hotvm files ...`: file-level backups (daily-files flow), the catalog, single-file restore.

Paths are '/<volume>/<path in it>' (volume = '<disk>-p<N>' as Linux numbers partitions, e.g.
/vda-p1/etc/hosts); `hotvm files ls VM` lists the volumes. --backup takes a file set id or an image set id
(image backups are browsed through their chunks); without it, the newest file set (at or before --at).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import emit, err, out
from hotvm.errors import HotvmError

files_app = typer.Typer(
    help="File-level backups: daily, incremental, searchable catalog, single-file restore.",
    no_args_is_help=True,
)
BackupOpt = Annotated[str | None, typer.Option("--backup", help="backup id: a file set or an image set")]
AtOpt = Annotated[
    str | None,
    typer.Option("--at", help="the newest file backup completed by this time (ISO date or date-time, UTC)"),
]


def parse_at(value: str | None) -> dt.datetime | None:
    """'2026-11-27' = the end of that day; '2026-11-27T10:00' = that instant; naive times are UTC."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC) + dt.timedelta(
                days=1, microseconds=-1
            )
        at = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HotvmError(
            f"--at {value!r} is not a date", "give e.g. 2026-11-27 or 2026-11-27T10:30"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)


def _repo(config: Path | None, target: str | None):  # noqa: ANN202
    """The file sets' repository (a context manager: closes its target)."""
    from hotvm.config_file import load_config
    from hotvm.files.browse import default_files_target
    from hotvm.formats.opener import open_repository

    cfg = load_config(config)
    return open_repository(cfg, target if target is not None else default_files_target(cfg))


def _time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_") and k != "pieces"}


@files_app.command("backup")
def files_backup(
    vm: Annotated[str, typer.Argument(help="VM name from hotvm.yaml")],
    target: TargetOpt = None,
    config: ConfigOpt = None,
    new: Annotated[
        bool, typer.Option("--new", help="start a new set even if an unfinished one exists")
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Back up the files of a running VM now (the daily-files flow for one VM); resumes an unfinished set."""
    prefect_env(verbose)
    from hotvm.config_file import load_config
    from hotvm.hypervisors.resolve import find_vm

    cfg = load_config(config)
    find_vm(cfg, vm)
    from flows.daily_files import files_target, files_vm
    from hotvm.backup import open_session

    target = files_target(open_session(vm, cfg), target)
    from hotvm.formats.opener import open_repository
    from hotvm.resume import files_resume_id

    resume_id = None
    if not new:
        with open_repository(cfg, target) as repo:
            resume_id = files_resume_id(repo, vm)
    if resume_id:
        err.print(f"resuming unfinished file set {resume_id} (use --new for a fresh one)")
    result = files_vm(vm=vm, target=target, config=config_str(config), backup_id=resume_id)
    emit(result, as_json, _render_backup)


def _render_backup(result: dict) -> None:
    out.print(f"[bold green]file backup {result['backup_id']} of {result['vm']} complete[/]")
    if result["incremental_from"]:
        out.print(f"incremental from {result['incremental_from']}")
    table = Table(
        "file system", "type", "files seen", "files read", "files stored", "bytes new", "bytes unchanged"
    )
    for r in result["volumes"]:
        if r["status"] == "ok":
            table.add_row(
                r["volume"], r["fstype"] + (" (unchanged: not walked)" if r.get("unchanged_volume") else ""),
                str(r["files_seen"]), str(r["files_read"]), str(r["files_stored"]),
                str(r["bytes_new"]), str(r["bytes_unchanged"]),
            )  # fmt: skip
        else:
            table.add_row(r["volume"], f"[yellow]skipped: {r['reason']}[/]", "", "", "", "", "")
    out.print(table)
    for warning in result["warnings"]:
        out.print(f"[yellow]warning:[/] {warning}")


@files_app.command("find")
def files_find(
    vm: Annotated[str, typer.Argument(help="VM name as backed up")],
    pattern: Annotated[
        str, typer.Argument(help="glob on the name ('sales*.xls'), or on the path if it has a /")
    ],
    at: AtOpt = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every version of matching files across the backups in the catalog."""
    from hotvm.files.browse import synced_catalog

    with _repo(config, target) as repo, synced_catalog(repo, vm) as catalog:
        rows = catalog.find(vm, pattern, parse_at(at))

    def render(rows: list[dict]) -> None:
        table = Table("path", "backup", "kind", "size", "modified")
        for r in rows:
            table.add_row(r["path"], r["backup_id"], r["kind"], str(r["size"]), _time(r["mtime_ns"]))
        out.print(table)
        out.print(f"{len(rows)} match(es)")

    emit(rows, as_json, render)


@files_app.command("ls")
def files_ls(
    vm: Annotated[str, typer.Argument(help="VM name as backed up")],
    path: Annotated[str, typer.Argument(help="/<volume>/<path>; '/' lists the volumes")] = "/",
    backup_id: BackupOpt = None,
    at: AtOpt = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a directory of a backup (a file set, or an image set read through its chunks)."""
    from hotvm.files.browse import list_directory, resolve_set, synced_catalog

    with _repo(config, target) as repo:
        ref = resolve_set(repo, vm, backup_id, parse_at(at))
        with synced_catalog(repo, vm) as catalog:
            rows, problems = list_directory(catalog, repo, ref, path)
    for problem in problems:
        err.print(f"[yellow]not readable:[/] {problem}")
    if not rows and path.strip("/"):
        raise HotvmError(f"{path} is not in backup {ref.backup_id} of {vm}", f"see 'hotvm files ls {vm}'")

    def render(rows: list[dict]) -> None:
        out.print(f"{ref.kind} backup {ref.backup_id} ({ref.completed_at:%Y-%m-%d %H:%M} UTC)")
        table = Table("mode", "uid", "gid", "size", "modified", "path")
        for r in rows:
            name = (
                r["path"]
                + ("/" if r["kind"] == "dir" else "")
                + (f" -> {r['target']}" if r["target"] else "")
            )
            table.add_row(
                oct(r["mode"]), str(r["uid"]), str(r["gid"]), str(r["size"]), _time(r["mtime_ns"]), name
            )
        out.print(table)

    emit(rows, as_json, render)


@files_app.command("restore")
def files_restore(
    vm: Annotated[str, typer.Argument(help="VM name as backed up")],
    paths: Annotated[list[str], typer.Argument(help="files or directories: /<volume>/<path>")],
    to: Annotated[Path, typer.Option("--to", help="directory to restore into (each at its full path)")],
    backup_id: BackupOpt = None,
    at: AtOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace files that exist in --to")] = False,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore files and directories with their metadata, without restoring the disk image."""
    from hotvm.files.browse import resolve_set
    from hotvm.files.restore import restore_paths

    with _repo(config, target) as repo:
        ref = resolve_set(repo, vm, backup_id, parse_at(at))
        result = restore_paths(repo, ref, paths, to.resolve(), overwrite)

    def render(r: dict) -> None:
        out.print(
            f"[bold green]restored {r['files']} file(s), {r['dirs']} dir(s), {r['symlinks']} symlink(s), "
            f"{r['hardlinks']} hard link(s), {r['bytes']} bytes[/] from {r['kind']} backup {r['backup_id']} "
            f"into {r['to']}"
        )
        for problem in r["metadata_errors"]:
            out.print(f"[yellow]metadata not restored:[/] {problem}", markup=False, highlight=False)
        for problem in r["skipped"]:
            err.print(f"skipped (unsafe or invalid): {problem}", markup=False, highlight=False)
        if r["skipped_count"] > len(r["skipped"]):
            err.print(f"... and {r['skipped_count'] - len(r['skipped'])} more skipped entries")

    emit(result, as_json, render)


@files_app.command("catalog")
def files_catalog(
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="recreate it from the backup sets alone")
    ] = False,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sync the local catalog with the target (index new file sets, drop pruned ones)."""
    from hotvm.files.browse import synced_catalog
    from hotvm.files.catalog import remove_catalog

    with _repo(config, target) as repo:
        if rebuild:
            remove_catalog(repo)
        with synced_catalog(repo) as catalog:
            result = {"catalog": str(catalog.path), "sets": len(catalog.sets()),
                      "entries": catalog.entry_count(), "rebuilt": rebuild}  # fmt: skip
    emit(
        result,
        as_json,
        lambda r: out.print(f"catalog {r['catalog']}: {r['sets']} set(s), {r['entries']} entries"),
    )


def hybrid_restore_cmd(
    vm: str, to: Path, backup_id: str | None, target: str | None, config: Path | None, as_json: bool
) -> None:
    """`hotvm restore VM --hybrid --to DIR`: the disaster-recovery path (docs/files.md)."""
    from hotvm.files.hybrid import hybrid_restore

    result = hybrid_restore(config, vm, to, target, backup_id)

    def render(r: dict) -> None:
        out.print(f"[bold green]restored {r['vm']} image {r['backup_id']} (raw) into {r['to']}[/]")
        for disk in r["disks"]:
            out.print(f"  {disk['device']}: {disk['path']}")
        if r["files_backup_id"]:
            out.print(f"applied file backup {r['files_backup_id']}:")
        for v in r["volumes"]:
            if "skipped" in v:
                out.print(f"  {v['volume']}: [yellow]skipped: {v['skipped']}[/]")
            else:
                out.print(
                    f"  {v['volume']} ({v['fstype']}): {v['written']} written, {v['deleted']} deleted, "
                    f"{v['unchanged']} unchanged"
                )
                for problem in v.get("skipped", []):
                    err.print(f"  skipped (unsafe or invalid): {problem}", markup=False, highlight=False)
        for note in r["notes"]:
            out.print(f"[yellow]note:[/] {note}")

    emit(result, as_json, render)
