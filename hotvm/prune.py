"""Apply retention decisions to a repository: delete sets, then mark and sweep the shared chunk store.

One path, whoever runs it: `run_prune(steps, policy)` over a small steps interface (PruneSteps): the
prune flow runs it with steps that are Prefect tasks (tasks/prune.py TaskSteps), `prune_repository`, the
tests and anything without Prefect with RepositorySteps over an open repository. Image sets (`vms/`) and
daily file sets (`files/`) are listed by the one lister below over their set stores
(hotvm/formats/setstore.py) and decided, removed and marked alike.

Chunks are shared by every set (and VM) in the repository, so deleting a set frees nothing by itself; what
frees space is the sweep of chunks that no remaining set references. Other backups may run meanwhile:
1. decide (hotvm/retention.py) over what the target holds now, each VM by its own policy (PrunePolicy);
2. delete each removed set, `manifest.json` first: a half-deleted set is merely incomplete, never a
   "complete" set missing its files, and the next prune finishes it. An incomplete set that was written
   to after the decision (a resumed run) is left alone;
3. mark every chunk referenced by a manifest of a remaining set and by the journals (disk records, volume
   records) of remaining incomplete sets, read from the target right before the sweep;
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
`dry_run` does all of it without deleting anything and reports what would go, and why."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from hotvm import immutability, retention
from hotvm.config import TABLE_7_3_FILES_KEEP, Config, Keep, TargetConfig
from hotvm.config_file import load_config
from hotvm.errors import ChecksumMismatch, HotvmError
from hotvm.files.filesets import FileSetManifest, FileSets
from hotvm.formats.bounds import MANIFEST_MAX
from hotvm.formats.manifest import Manifest, id_time, utcnow
from hotvm.formats.repository import Repository, read_marker
from hotvm.formats.setstore import TMP_MARK, SetStore
from hotvm.hypervisors.resolve import resolve_vms
from hotvm.retention import BackupPoint, Decision, SetState, ago, may_be_running
from targets.base import Entry, Target

DEFAULT_SET_GRACE = retention.DEFAULT_INCOMPLETE_GRACE
DEFAULT_CHUNK_GRACE = dt.timedelta(hours=1)
FILES_KEEP = TABLE_7_3_FILES_KEEP
"""File sets of a VM whose policy names no `files.keep` (seed Table 7.3: one month)."""
RECHECK_S = 5.0
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


@dataclass(frozen=True)
class PrunePolicy:
    """What one prune keeps: image sets by `images` unless the VM's policy gives its own (`per_vm`); file
    sets by `files` (one Keep for every VM, or per VM; default FILES_KEEP)."""

    images: Keep
    per_vm: Mapping[str, Keep] = field(default_factory=dict)
    files: Keep | Mapping[str, Keep] | None = None

    def keep_for(self, point: BackupPoint) -> Keep:
        if not is_file_set(point.path):
            return self.per_vm.get(point.vm, self.images)
        if isinstance(self.files, Keep):
            return self.files
        return (self.files or {}).get(point.vm, FILES_KEEP)


def prune_policy(
    config: Config | str | Path | None, target: str | None, **overrides: int | None
) -> tuple[TargetConfig, PrunePolicy]:
    """The target to prune and everything that decides what stays on it, from hotvm.yaml: the target's
    `keep:` (or keep flags) for images, else each VM's policy; each VM's `files.keep` for file sets."""
    cfg = load_config(config)
    target_cfg, images = target_and_policy(cfg, target, **overrides)
    per_vm = policy_keeps(cfg, target_cfg, **overrides)
    return target_cfg, PrunePolicy(images, per_vm, files_keeps(cfg))


# --------------------------------------------------------------------------- reading what the target holds


def repository_present(repo: Repository) -> bool:
    """False if the target holds no repository; refuses one written by a newer format, and (encrypted)
    a wrong or missing key, before anything else is read."""
    read_marker(repo.target, "prune it with the newer hotvm")  # a newer format says so first
    return repo.unlock()  # and a repository this host knew that vanished is an error, not "nothing here"


def stores(repo: Repository) -> list[SetStore]:
    """Every kind of set a repository holds, each under its own root."""
    return [repo.images, FileSets(repo)]


def store_of(repo: Repository, path: str) -> SetStore:
    """The store a set path (<root>/<vm>/<id>) belongs to."""
    return next(s for s in stores(repo) if path.startswith(f"{s.root}/"))


def is_file_set(path: str) -> bool:
    return path.startswith(f"{FileSets.root}/")


@dataclass(frozen=True)
class SetListing:
    """One set as the target shows it now."""

    point: BackupPoint
    manifest: Manifest | FileSetManifest | None
    files: tuple[Entry, ...]
    problem: str | None = None
    """Why the manifest cannot be read (state DAMAGED)."""


def _parse_time(value: object) -> dt.datetime | None:
    try:
        return retention.aware(dt.datetime.fromisoformat(str(value)))
    except ValueError:
        return None


def read_set(store: SetStore, path: str) -> SetListing | None:
    """The set at `path` of `store`, from fresh listings; None if it is gone (another prune removed it)."""
    target = store.target
    vm_dir, backup_id = path.split("/")[1:3]
    files = tuple(target.scan(path))
    if not files:
        return None
    names = {f.name: f for f in files}
    if "manifest.json" in names:
        try:
            manifest = store.parse_manifest(path)
        except FileNotFoundError:
            return None
        except (ValueError, ChecksumMismatch) as exc:
            when = names["manifest.json"].modified or id_time(backup_id) or utcnow()
            point = BackupPoint(vm_dir, backup_id, SetState.DAMAGED, when, path=path)
            return SetListing(point, None, files, problem=str(exc).splitlines()[0])
        point = BackupPoint(manifest.vm, backup_id, SetState.COMPLETE, manifest.completed_at, path=path)
        return SetListing(point, manifest, files)
    started = store.read_started(path)
    times = [_parse_time(started.get("started_at")), id_time(backup_id)]
    times += [e.modified for e in files]
    for sub in store.journal_dirs:  # the last sign of life of an unfinished set: its newest journal
        if sub in names:
            times += [e.modified for e in target.scan(f"{path}/{sub}")]
    known = [t for t in times if t is not None]
    last_written = max(known) if known else utcnow()  # cannot tell: take it as just written (kept)
    vm = str(started.get("vm") or vm_dir)
    point = BackupPoint(vm, backup_id, SetState.INCOMPLETE, last_written, path=path)
    return SetListing(point, None, files)


def list_sets(repo: Repository, vm: str | None = None, store: SetStore | None = None) -> list[SetListing]:
    """The one lister: every set of one store (image sets by default), of one VM or all."""
    store = store or repo.images
    listings = (read_set(store, path) for path in store.set_paths(vm))
    return [listing for listing in listings if listing is not None]


def list_file_sets(repo: Repository, vm: str | None = None) -> list[SetListing]:
    return list_sets(repo, vm, FileSets(repo))


def listing_refs(store: SetStore, listing: SetListing) -> set[str] | None:
    """Chunks a set references: its manifest's, a damaged manifest's as far as they can be read (None: not
    at all), or an unfinished set's journaled ones."""
    path = listing.point.path
    if listing.manifest is not None:
        return store.refs(listing.manifest)
    if listing.point.state is SetState.DAMAGED:
        try:
            body = store.repo.read_file(f"{path}/manifest.json", limit=MANIFEST_MAX)
            return store.raw_refs(json.loads(body))
        except FileNotFoundError:
            return set()
        except (ValueError, KeyError, TypeError, IndexError, ChecksumMismatch):
            return None
    return store.journal_refs(path)


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


def backup_points(repo: Repository, vm: str | None = None) -> list[BackupPoint] | None:
    """Every set a prune decides on (None: the target holds no repository): image sets of `vm` (or all),
    and file sets of every VM (they share the chunk store the sweep frees), with holds and object locks."""
    if not repository_present(repo):
        return None
    held = repo.holds()
    listings = list_sets(repo, vm) + list_file_sets(repo)
    points = [dataclasses.replace(s.point, hold=held.get((s.point.vm, s.point.backup_id))) for s in listings]
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
            fresh = read_set(store_of(repo, p.path), p.path)
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


def _mark(repo: Repository, report: SweepReport, excluded: set[str], now: dt.datetime,
          set_grace: dt.timedelta) -> tuple[set[str], list[SetListing]]:
    """Chunks every remaining set (of every store) references; skip reasons go into `report`."""
    marked: set[str] = set()
    remaining: list[SetListing] = []
    for store in stores(repo):
        for path in store.set_paths():
            s = None if path in excluded else read_set(store, path)  # a removed set is not even read
            if s is None:
                continue
            remaining.append(s)
            where = f"{s.point.vm}/{s.point.backup_id}"
            refs = listing_refs(store, s)
            if refs is None:
                report.skipped_because.append(
                    f"manifest of {store.noun} {where} is unreadable: its chunks are unknown"
                )
                continue
            marked |= refs
            if s.point.state is SetState.INCOMPLETE and may_be_running(s.point, now, set_grace):
                report.skipped_because.append(
                    f"{store.noun} {where} may still be running (last written {ago(now - s.point.time)} ago)"
                )
    return marked, remaining


def sweep(
    repo: Repository,
    *,
    dry_run: bool,
    exclude: Iterable[str] = (),
    now: dt.datetime | None = None,
    set_grace: dt.timedelta = DEFAULT_SET_GRACE,
    chunk_grace: dt.timedelta = DEFAULT_CHUNK_GRACE,
) -> SweepReport:
    """Mark from what the target holds now (minus `exclude`: set paths removed, or to be removed in a dry
    run), then sweep the chunk store. `now` is the wall clock that chunk modification times are held to."""
    target = repo.target
    now = retention.aware(now or utcnow())
    report = SweepReport()
    if not repository_present(repo):
        report.skipped_because.append(f"no hotvm repository at {target.display()}")
        return report
    excluded = set(exclude)
    marked, listings = _mark(repo, report, excluded, now, set_grace)
    known = {s.point.path for s in listings} | excluded
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
            new = sorted({p for s in stores(repo) for p in s.set_paths()} - known)
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


def gone(decisions: list[Decision], outcomes: list[SetOutcome], dry_run: bool) -> list[str]:
    """Paths of the sets that are removed (or, in a dry run, would be): the sweep marks without them."""
    return [
        d.point.path
        for d, o in zip(decisions, outcomes, strict=True)
        if o.removed or (dry_run and not o.keep)
    ]


# --------------------------------------------------------------------------- the one prune path


class PruneSteps(abc.ABC):
    """The four steps of a prune, each over the repository as it is when the step runs. Implementations
    only carry the steps out (RepositorySteps here; tasks/prune.py TaskSteps as Prefect tasks): what is
    decided, in which order, lives in run_prune alone."""

    target: str
    url: str

    @abc.abstractmethod
    def list_sets(self, vm: str | None) -> list[BackupPoint] | None:
        """backup_points: every set to decide on; None if the target holds no repository."""

    @abc.abstractmethod
    def decide(self, points: list[BackupPoint], policy: Keep, now: dt.datetime,
               set_grace: dt.timedelta) -> list[Decision]:
        """retention.decide (pure)."""

    @abc.abstractmethod
    def remove_sets(self, decisions: list[Decision], dry_run: bool) -> list[SetOutcome]:
        """remove_sets: delete the sets the policy does not keep."""

    @abc.abstractmethod
    def sweep(self, removed: list[str], dry_run: bool, now: dt.datetime, set_grace: dt.timedelta,
              chunk_grace: dt.timedelta) -> SweepReport:
        """sweep: mark what remains, free the rest of the chunk store."""


class RepositorySteps(PruneSteps):
    """The steps as plain calls on one open repository (the CLI's library use, tests, scripts)."""

    def __init__(self, repo: Repository) -> None:
        self.repo, self.target, self.url = repo, repo.target.name, repo.target.display()

    def list_sets(self, vm: str | None) -> list[BackupPoint] | None:
        return backup_points(self.repo, vm)

    def decide(self, points: list[BackupPoint], policy: Keep, now: dt.datetime,
               set_grace: dt.timedelta) -> list[Decision]:
        return retention.decide(points, policy, now, incomplete_grace=set_grace)

    def remove_sets(self, decisions: list[Decision], dry_run: bool) -> list[SetOutcome]:
        return remove_sets(self.repo, decisions, dry_run=dry_run)

    def sweep(self, removed: list[str], dry_run: bool, now: dt.datetime, set_grace: dt.timedelta,
              chunk_grace: dt.timedelta) -> SweepReport:
        return sweep(self.repo, dry_run=dry_run, exclude=removed, now=now, set_grace=set_grace,
                     chunk_grace=chunk_grace)


def run_prune(
    steps: PruneSteps,
    policy: PrunePolicy,
    *,
    vm: str | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    set_grace: dt.timedelta = DEFAULT_SET_GRACE,
    chunk_grace: dt.timedelta = DEFAULT_CHUNK_GRACE,
) -> PruneReport:
    """Everything a prune does, in this order, whoever runs the steps (the prune flow, `hotvm prune`,
    prune_repository): list, decide each kind of set of each VM by its own Keep, remove, sweep."""
    now = retention.aware(now or utcnow())
    report = PruneReport(target=steps.target, url=steps.url, vm=vm, dry_run=dry_run, policy=policy.images,
                         at=now)
    points = steps.list_sets(vm)
    if points is None:
        report.sweep.skipped_because.append(f"no hotvm repository at {steps.url}")
        report.sweep.notes.append("no hotvm repository on this target: nothing to prune")
        return report
    groups: dict[tuple[bool, str], tuple[Keep, list[BackupPoint]]] = {}
    for point in points:
        keep = policy.keep_for(point)
        groups.setdefault((is_file_set(point.path), keep.model_dump_json()), (keep, []))[1].append(point)
    decisions = [d for keep, group in groups.values() for d in steps.decide(group, keep, now, set_grace)]
    decisions.sort(key=lambda d: (is_file_set(d.point.path), d.point.vm))  # stable: oldest first per VM
    outcomes = steps.remove_sets(decisions, dry_run)
    report.sweep = steps.sweep(gone(decisions, outcomes, dry_run), dry_run, now, set_grace, chunk_grace)
    kinds = [is_file_set(d.point.path) for d in decisions]
    report.sets = [o for o, files in zip(outcomes, kinds, strict=True) if not files]
    report.sweep.file_sets = [o for o, files in zip(outcomes, kinds, strict=True) if files]
    return report


def prune_repository(
    repo: Repository,
    policy: Keep | PrunePolicy,
    *,
    vm: str | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    set_grace: dt.timedelta = DEFAULT_SET_GRACE,
    chunk_grace: dt.timedelta = DEFAULT_CHUNK_GRACE,
) -> PruneReport:
    """run_prune on an open repository, without Prefect (a Keep: for every VM's image sets; file sets by
    FILES_KEEP)."""
    if isinstance(policy, Keep):
        policy = PrunePolicy(policy)
    return run_prune(RepositorySteps(repo), policy, vm=vm, dry_run=dry_run, now=now, set_grace=set_grace,
                     chunk_grace=chunk_grace)
