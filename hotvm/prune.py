"""Apply retention decisions to a repository: delete sets, then mark and sweep the shared chunk store.

Chunks are shared by every set (and VM) in the repository, so deleting a set frees nothing by itself; what
frees space is the sweep of chunks that no remaining set references. Other backups may run meanwhile:
1. decide (hotvm/retention.py) over what the target holds now;
2. delete each removed set, `manifest.json` first: a half-deleted set is merely incomplete, never a
   "complete" set missing its files, and the next prune finishes it. An incomplete set that was written
   to after the decision (a resumed run) is left alone;
3. mark every chunk referenced by a manifest of a remaining set and by the disk journals
   (`disks/*.json`) of remaining incomplete sets, read from the target right before the sweep;
4. sweep unreferenced chunks, but only
   - if no backup may be running on the target (an incomplete set written to within the grace period):
     a running export reuses any chunk already in the store and journals its references only when the
     disk is done, so no sweep could be safe then. The sweep is skipped, says why, and the next prune
     does it (sets are still deleted: that frees no chunk a running backup could be reading);
   - if the target reports modification times, and only chunks older than `chunk_grace`: a backup that
     starts during the sweep writes new chunks, which are younger;
   - while no new set has appeared on the target (checked every few seconds): a backup that starts
     during the sweep may reuse an old unreferenced chunk, so the sweep stops there;
5. remove stray `*.tmp-*` files (torn uploads) older than `chunk_grace`.
`dry_run` does all of it without deleting anything and reports what would go, and why.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from hotvm import immutability, retention
from hotvm.config import Config, Keep, TargetConfig
from hotvm.config_file import load_config
from hotvm.errors import ChecksumMismatch, HotvmError
from hotvm.files.filesets import FileSets
from hotvm.formats.manifest import DiskRecord, Manifest, utcnow
from hotvm.formats.repository import Repository, read_marker, vm_dirs
from hotvm.hypervisors.resolve import resolve_vms
from hotvm.retention import BackupPoint, Decision, SetState, ago, may_be_running
from targets import open_target
from targets.base import Entry, Target

DEFAULT_SET_GRACE = retention.DEFAULT_INCOMPLETE_GRACE
DEFAULT_CHUNK_GRACE = dt.timedelta(hours=1)
RECHECK_S = 5.0
TMP_MARK = ".tmp-"
PROBE_PREFIX = ".hotvm-probe"


# --------------------------------------------------------------------------- configuration


def target_and_policy(
    config: Config | str | Path | None, target: str | None, **overrides: int | None
) -> tuple[TargetConfig, Keep]:
    """The target to prune and its policy: the target's `keep:` unless keep flags replace it."""
    cfg = load_config(config)
    target_cfg = cfg.find_target(target)
    return target_cfg, retention.with_overrides(target_cfg.keep, **overrides)


def policy_keeps(cfg: Config, target_cfg: TargetConfig, **overrides: int | None) -> dict[str, Keep]:
    """Per-VM retention from the policies (hotvm/policies.py): each VM whose policy's image target is this
    target gets the policy's `image.keep`. Empty when the target has an explicit `keep:` or keep flags
    are given: those apply to every VM."""
    from hotvm.policies import policy_for_vm

    if "keep" in target_cfg.model_fields_set or any(v is not None for v in overrides.values()):
        return {}
    default_target = next((t.name for t in cfg.targets if t.default), None)
    if default_target is None and len(cfg.targets) == 1:
        default_target = cfg.targets[0].name
    keeps = {}
    for _, vm in resolve_vms(cfg).require():
        policy = policy_for_vm(cfg, vm.name)
        if policy is not None and (policy.image.target or default_target) == target_cfg.name:
            keeps[vm.name] = policy.image.keep
    return keeps


def files_keeps(cfg: Config) -> dict[str, Keep]:
    """Per-VM retention of file sets: the `files.keep` of each VM's policy (default Table 7.3, 31 days)."""
    from hotvm.policies import policy_for_vm

    keeps = {}
    for _, vm in resolve_vms(cfg).require():
        policy = policy_for_vm(cfg, vm.name)
        if policy is not None and policy.files is not None:
            keeps[vm.name] = policy.files.keep
    return keeps


@contextmanager
def opened(config: Config | str | Path | None, target: str | None) -> Iterator[Repository]:
    cfg = load_config(config)
    tgt = open_target(cfg.find_target(target))
    try:
        yield Repository(tgt)
    finally:
        tgt.close()


# --------------------------------------------------------------------------- reading what the target holds


def repository_present(repo: Repository) -> bool:
    """False if the target holds no repository; refuses one written by a newer format, and (encrypted)
    a wrong or missing key, before anything else is read."""
    read_marker(repo.target, "prune it with the newer hotvm")  # a newer format says so first
    return repo.unlock()  # and a repository this host knew that vanished is an error, not "nothing here"


@dataclass(frozen=True)
class SetListing:
    """One set as the target shows it now."""

    point: BackupPoint
    manifest: Manifest | None
    files: tuple[Entry, ...]
    problem: str | None = None
    """Why the manifest cannot be read (state DAMAGED)."""


def id_time(backup_id: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def set_paths(target: Target, vm: str | None = None) -> Iterator[str]:
    """`vms/<vm>/<backup_id>` of every set (of one VM), from fresh listings."""
    dirs = vm_dirs(vm) if vm else [e.name for e in target.scan("vms") if e.is_dir is not False]
    for vm_dir in dirs:
        for entry in target.scan(f"vms/{vm_dir}"):
            if entry.is_dir is not False and TMP_MARK not in entry.name:
                yield f"vms/{vm_dir}/{entry.name}"


def _parse_time(value: object) -> dt.datetime | None:
    try:
        return retention.aware(dt.datetime.fromisoformat(str(value)))
    except ValueError:
        return None


def read_set(repo: Repository, path: str) -> SetListing | None:
    """None if the set is gone (another prune removed it meanwhile)."""
    target = repo.target
    vm_dir, backup_id = path.split("/")[1:3]
    files = tuple(target.scan(path))
    if not files:
        return None
    names = {f.name: f for f in files}
    if "manifest.json" in names:
        try:
            manifest = repo.parse_manifest(path)
        except FileNotFoundError:
            return None
        except (ValueError, ChecksumMismatch) as exc:
            when = names["manifest.json"].modified or id_time(backup_id) or utcnow()
            point = BackupPoint(vm_dir, backup_id, SetState.DAMAGED, when, path=path)
            return SetListing(point, None, files, problem=str(exc).splitlines()[0])
        point = BackupPoint(manifest.vm, backup_id, SetState.COMPLETE, manifest.completed_at, path=path)
        return SetListing(point, manifest, files)
    started = repo.read_started(path)
    journals = target.scan(f"{path}/disks") if "disks" in names else []
    times = [_parse_time(started.get("started_at")), id_time(backup_id)]
    times += [e.modified for e in (*files, *journals)]
    known = [t for t in times if t is not None]
    last_written = max(known) if known else utcnow()  # cannot tell: take it as just written (kept)
    vm = str(started.get("vm") or vm_dir)
    point = BackupPoint(vm, backup_id, SetState.INCOMPLETE, last_written, path=path)
    return SetListing(point, None, files)


def list_sets(repo: Repository, vm: str | None = None) -> list[SetListing]:
    listings = (read_set(repo, path) for path in set_paths(repo.target, vm))
    return [listing for listing in listings if listing is not None]


def _manifest_refs(manifest: Manifest) -> set[str]:
    return {digest for disk in manifest.disks for digest in disk.digests()}


def _raw_refs(repo: Repository, path: str) -> set[str] | None:
    """Chunk references of a manifest this hotvm cannot validate; None if not even that can be read."""
    try:
        body = json.loads(repo.read_file(f"{path}/manifest.json"))
        return {str(pair[1]) for disk in body["disks"] for pair in disk["chunks"]}
    except FileNotFoundError:
        return set()
    except (ValueError, KeyError, TypeError, IndexError, ChecksumMismatch):
        return None


def _journal_refs(repo: Repository, path: str) -> set[str]:
    """Chunks of the disks an incomplete set has finished (a torn journal: that disk is exported again)."""
    refs: set[str] = set()
    for entry in repo.target.scan(f"{path}/disks"):
        if entry.name.endswith(".json") and TMP_MARK not in entry.name:
            try:
                record = DiskRecord.model_validate_json(repo.read_file(f"{path}/disks/{entry.name}"))
            except (FileNotFoundError, ValueError, ChecksumMismatch):
                continue
            refs.update(record.digests())  # a patched chunk lists its base too
    return refs


# --------------------------------------------------------------------------- reports


class SetOutcome(BaseModel):
    vm: str
    backup_id: str
    state: SetState
    time: dt.datetime
    keep: bool
    reasons: list[str]
    removed: bool = False
    """Deleted by this run (always False in a dry run)."""
    error: str | None = None


class SweepReport(BaseModel):
    swept: bool = False
    """The sweep ran (in a dry run: would run); False when skipped_because says why not."""
    skipped_because: list[str] = []
    chunks_total: int = 0
    chunks_referenced: int = 0
    chunks_unreferenced: int = 0
    chunks_removed: int = 0
    """In a dry run: would be removed."""
    chunk_bytes_freed: int = 0
    chunks_too_young: int = 0
    """Unreferenced but younger than the grace period (a backup may have just written them)."""
    chunks_locked: int = 0
    """Unreferenced but still under S3 Object Lock: left until their lock expires."""
    tmp_removed: list[str] = []
    tmp_bytes_freed: int = 0
    notes: list[str] = []
    file_sets: list[SetOutcome] = []
    """Daily file sets (files/...): kept by the files policy (Table 7.3: one month), their chunks marked."""


class PruneReport(BaseModel):
    target: str
    url: str
    vm: str | None = None
    dry_run: bool
    policy: Keep
    at: dt.datetime
    sets: list[SetOutcome] = []
    sweep: SweepReport = Field(default_factory=SweepReport)

    @property
    def kept(self) -> list[SetOutcome]:
        return [s for s in self.sets if s.keep]

    @property
    def removed(self) -> list[SetOutcome]:
        return [s for s in self.sets if not s.keep and not s.error]

    @property
    def errors(self) -> list[str]:
        return [f"{s.vm}/{s.backup_id}: {s.error}" for s in self.sets if s.error]

    @property
    def bytes_freed(self) -> int:
        return self.sweep.chunk_bytes_freed + self.sweep.tmp_bytes_freed

    def summary(self) -> dict:
        """The report as JSON-ready data, with the totals a reader wants first."""
        return {
            **self.model_dump(mode="json"),
            "kept": len(self.kept),
            "removed": len(self.removed),
            "bytes_freed": self.bytes_freed,
            "errors": self.errors,
        }


# --------------------------------------------------------------------------- steps


def backup_points(repo: Repository, vm: str | None = None) -> list[BackupPoint]:
    if not repository_present(repo):
        return []
    held = repo.holds()
    points = [listing.point for listing in list_sets(repo, vm)]
    points = [dataclasses.replace(p, hold=held.get((p.vm, p.backup_id))) for p in points]
    return immutability.with_lock_holds(repo.target, points)  # S3 Object Lock: kept until it expires


def _delete_set(target: Target, path: str) -> None:
    target.delete(f"{path}/manifest.json")  # first: from here on the set is incomplete, never half-complete
    target.delete_tree(path)


def remove_sets(repo: Repository, decisions: Iterable[Decision], *, dry_run: bool) -> list[SetOutcome]:
    outcomes = []
    for d in decisions:
        p = d.point
        outcome = SetOutcome(
            vm=p.vm, backup_id=p.backup_id, state=p.state, time=p.time, keep=d.keep, reasons=list(d.reasons)
        )
        outcomes.append(outcome)
        if d.keep or dry_run:
            continue
        if p.state is not SetState.COMPLETE:
            fresh = read_set(repo, p.path)
            if fresh is None:
                outcome.removed = True
                continue
            if fresh.point.state is not p.state or fresh.point.time > p.time:
                outcome.keep = True
                outcome.reasons.append("written to since the decision (resumed?): left for the next prune")
                continue
        try:
            _delete_set(repo.target, p.path)
            outcome.removed = True
        except HotvmError as exc:
            outcome.error = str(exc)
    return outcomes


def _removable_stray(entry: Entry, cutoff: dt.datetime) -> bool:
    stray = TMP_MARK in entry.name or entry.name.startswith(PROBE_PREFIX)
    return stray and entry.is_dir is not True and entry.modified is not None and entry.modified < cutoff


def _set_strays(target: Target, listing: SetListing) -> Iterator[tuple[str, Entry]]:
    path = listing.point.path
    for entry in listing.files:
        if entry.is_dir:
            yield from ((f"{path}/{entry.name}", e) for e in target.scan(f"{path}/{entry.name}"))
        else:
            yield path, entry


def sweep(
    repo: Repository,
    *,
    dry_run: bool,
    exclude: Iterable[str] = (),
    now: dt.datetime | None = None,
    set_grace: dt.timedelta = DEFAULT_SET_GRACE,
    chunk_grace: dt.timedelta = DEFAULT_CHUNK_GRACE,
    files_keep: Keep | Mapping[str, Keep] | None = None,
) -> SweepReport:
    """Mark from what the target holds now (minus `exclude`: set paths removed, or to be removed in a dry
    run), then sweep the chunk store. `now` is the wall clock that chunk modification times are held to.
    File sets are pruned here first (`files_keep`: one Keep, or per VM as from `files_keeps`; default Table
    7.3: 31 days), then marked as image sets."""
    target = repo.target
    now = retention.aware(now or utcnow())
    report = SweepReport()
    if not repository_present(repo):
        report.skipped_because.append(f"no hotvm repository at {target.display()}")
        return report
    excluded = set(exclude)
    listings = [s for s in list_sets(repo) if s.point.path not in excluded]
    known = {s.point.path for s in listings} | excluded
    marked: set[str] = set()
    for s in listings:
        where = f"{s.point.vm}/{s.point.backup_id}"
        if s.manifest is not None:
            marked |= _manifest_refs(s.manifest)
        elif s.point.state is SetState.DAMAGED:
            refs = _raw_refs(repo, s.point.path)
            if refs is None:
                report.skipped_because.append(f"manifest of {where} is unreadable: its chunks are unknown")
            else:
                marked |= refs
        else:
            marked |= _journal_refs(repo, s.point.path)
            if may_be_running(s.point, now, set_grace):
                report.skipped_because.append(
                    f"backup {where} may still be running (last written {ago(now - s.point.time)} ago)"
                )
    known |= _mark_file_sets(repo, report, marked, dry_run, now, set_grace, files_keep)
    cutoff = now - chunk_grace
    strays: list[tuple[str, Entry]] = []
    no_time = 0
    stop = ""
    last_check = -float("inf")
    for prefix in target.scan("chunks"):
        if prefix.is_dir is False:
            strays.append(("chunks", prefix))
            continue
        doomed: list[Entry] = []
        for entry in target.scan(f"chunks/{prefix.name}"):
            if TMP_MARK in entry.name:
                strays.append((f"chunks/{prefix.name}", entry))
                continue
            report.chunks_total += 1
            if entry.name in marked:
                report.chunks_referenced += 1
                continue
            report.chunks_unreferenced += 1
            if entry.modified is None:
                no_time += 1
            elif entry.modified >= cutoff:
                report.chunks_too_young += 1
            else:
                doomed.append(entry)
        if report.skipped_because or stop or not doomed:
            continue
        if not dry_run and time.monotonic() - last_check >= RECHECK_S:
            last_check = time.monotonic()
            new = sorted((set(set_paths(target)) | set(FileSets(repo).set_paths())) - known)
            if new:
                stop = f"a new backup started during the sweep ({new[0]}): sweep stopped"
                continue
        paths, locked = immutability.unlocked(target, [f"chunks/{prefix.name}/{e.name}" for e in doomed], now)
        report.chunks_locked += locked
        sizes = {f"chunks/{prefix.name}/{e.name}": e.size or 0 for e in doomed}
        for path in paths:
            if not dry_run:
                target.delete(path)
            report.chunks_removed += 1
            report.chunk_bytes_freed += sizes[path]
    report.swept = not report.skipped_because
    if stop:
        report.notes.append(stop + "; the rest is left for the next prune")
    if no_time:
        report.notes.append(
            f"target '{target.name}' does not report modification times: {no_time} unreferenced chunk(s) "
            "left (prune cannot tell them from chunks a running backup has just written)"
        )
    if report.chunks_locked:
        report.notes.append(f"{report.chunks_locked} unreferenced chunk(s) are still under S3 Object Lock: "
                            "left for a prune after their retention expires")
    if report.skipped_because and report.chunks_unreferenced:
        report.notes.append(f"{report.chunks_unreferenced} unreferenced chunk(s) are left for the next prune")
    strays += [("", e) for e in target.scan("")]
    for s in listings:
        strays += _set_strays(target, s)
    for folder, entry in strays:
        if _removable_stray(entry, cutoff):
            path = f"{folder}/{entry.name}" if folder else entry.name
            if not dry_run:
                target.delete(path)
            report.tmp_removed.append(path)
            report.tmp_bytes_freed += entry.size or 0
    return report


def _mark_file_sets(
    repo: Repository,
    report: SweepReport,
    marked: set[str],
    dry_run: bool,
    now: dt.datetime,
    set_grace: dt.timedelta,
    files_keep: Keep | Mapping[str, Keep] | None,
) -> set[str]:
    """Retention of the file sets, then mark the chunks of those that stay; returns every file set path."""
    from hotvm.files.prune import FILES_KEEP, list_file_sets

    listings = list_file_sets(repo)
    locked = immutability.with_lock_holds(repo.target, [f.point for f in listings], now)
    listings = [dataclasses.replace(f, point=p) for f, p in zip(listings, locked, strict=True)]
    by_path = {f.point.path: f for f in listings}
    per_vm = files_keep if isinstance(files_keep, Mapping) else {}
    default = files_keep if isinstance(files_keep, Keep) else FILES_KEEP
    groups: dict[str, tuple[Keep, list]] = {}
    for f in listings:
        keep = per_vm.get(f.point.vm, default)
        groups.setdefault(keep.model_dump_json(), (keep, []))[1].append(f.point)
    decisions = [
        d
        for keep, points in groups.values()
        for d in retention.decide(points, keep, now, incomplete_grace=set_grace)
    ]
    report.file_sets = remove_sets(repo, decisions, dry_run=dry_run)
    for d, outcome in zip(decisions, report.file_sets, strict=True):
        if outcome.removed or (dry_run and not outcome.keep):
            continue
        listing = by_path[d.point.path]
        where = f"file set {d.point.vm}/{d.point.backup_id}"
        if listing.refs is None:
            report.skipped_because.append(f"manifest of {where} is unreadable: its chunks are unknown")
            continue
        marked |= listing.refs
        if may_be_running(d.point, now, set_grace):
            report.skipped_because.append(
                f"{where} may still be running (last written {ago(now - d.point.time)} ago)"
            )
    return set(by_path)


def prune_repository(
    repo: Repository,
    policy: Keep,
    *,
    vm: str | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    set_grace: dt.timedelta = DEFAULT_SET_GRACE,
    chunk_grace: dt.timedelta = DEFAULT_CHUNK_GRACE,
) -> PruneReport:
    """Everything `hotvm prune` does, without Prefect (the prune flow runs the same steps as tasks)."""
    now = retention.aware(now or utcnow())
    report = PruneReport(
        target=repo.target.name, url=repo.target.display(), vm=vm, dry_run=dry_run, policy=policy, at=now
    )
    if not repository_present(repo):
        report.sweep.notes.append("no hotvm repository on this target: nothing to prune")
        return report
    decisions = retention.decide(backup_points(repo, vm), policy, now, incomplete_grace=set_grace)
    report.sets = remove_sets(repo, decisions, dry_run=dry_run)
    report.sweep = sweep(
        repo,
        dry_run=dry_run,
        exclude=gone(decisions, report.sets, dry_run),
        now=now,
        set_grace=set_grace,
        chunk_grace=chunk_grace,
    )
    return report


def gone(decisions: list[Decision], outcomes: list[SetOutcome], dry_run: bool) -> list[str]:
    """Paths of the sets that are removed (or, in a dry run, would be): the sweep marks without them."""
    return [
        d.point.path
        for d, o in zip(decisions, outcomes, strict=True)
        if o.removed or (dry_run and not o.keep)
    ]
