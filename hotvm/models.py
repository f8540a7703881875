"""Typed data: the hotvm.yaml configuration and the backup-set manifest.

Config errors are turned into one message that names the file, the key path and the fix, because a
backup that silently runs with a mistyped option is worse than one that refuses to start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from hotvm import __version__
from hotvm.child_env import register_config
from hotvm.errors import ConfigError, UnknownTargetError, UnknownVMError

DEFAULT_CONFIG = Path("hotvm.yaml")
CONFIG_ENV = "HOTVM_CONFIG"


class StrictModel(BaseModel):
    """Config models: unknown keys refused; a refused value is never echoed (it may be a URL holding a
    password)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


# --------------------------------------------------------------------------- durations (RPO, RTO)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(value: object) -> dt.timedelta:
    """'24h', '30m', '7d', '1w', '90s' or combined ('1h30m') -> timedelta; anything else: ValueError."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    else:
        text = str(value).strip().lower().replace(" ", "") if isinstance(value, str) else ""
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(
                f"invalid duration {value!r}: give a number with a unit s, m, h, d or w, e.g. 30m, 24h, 7d"
            )
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: it must be longer than 0")
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact spelling: 86400 s -> '1d', 5400 s -> '1h30m'."""
    seconds = int(round(value.total_seconds()))
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out) or "0s"


Duration = Annotated[
    dt.timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
"""A duration in hotvm.yaml (rpo, rto): '30m', '24h', '7d'."""


# --------------------------------------------------------------------------- configuration


class BootCheckSpec(StrictModel):
    """How to tell that a restored copy of this VM came up (the seed's "test test test")."""

    ready_pattern: str = "login:"
    """Regular expression on the serial console that means 'up'."""
    timeout_s: float = Field(180, gt=0)
    memory_mb: int = Field(512, ge=16)
    kernel: Path | None = None
    """Direct kernel boot (VMs started with -kernel); otherwise the first disk is booted by the BIOS."""
    initrd: Path | None = None
    append: str = "console=ttyS0"


class VMConfig(StrictModel):
    name: str = Field(min_length=1)
    qmp: Path | None = None
    """The VM's QMP unix socket (QEMU driver): start the VM with -qmp unix:PATH,server=on,wait=off."""
    config_files: list[Path] = []
    """What defines the VM (the seed's VMX): launch script, OVMF vars, logs. Tarred into every backup."""
    overlay_dir: Path | None = None
    """Where REDO overlays are created; default: beside each disk image (like the seed's .REDO files)."""
    exclude_disks: list[str] = []
    """Devices never backed up (e.g. a scratch disk)."""
    boot_check: BootCheckSpec = BootCheckSpec()
    startup_order: int | None = None
    """Order this VM is started in (lower first) after a recovery; listed in the inventory."""
    external_data: list[str] = []
    """Data the VM depends on that lives outside its disks (NFS shares, databases...); in the inventory."""
    rpo: Duration | None = None
    """Overrides the policy's rpo for this VM (`hotvm plan check`)."""
    rto: Duration | None = None
    """Overrides the policy's rto for this VM."""
    tier: int | None = Field(None, ge=1)
    """Overrides the policy's tier (1 = recovered first)."""
    guest_agent: Path | None = None
    """QEMU driver: the guest agent's unix socket (-chardev socket,path=PATH,server=on,wait=off + a
    virtserialport named org.qemu.guest_agent.0); needed for `quiesce: true`."""
    standby_host: str | None = None
    """Host the sync-config flow keeps a powered-off copy of this VM registered on (seed: VMX sync)."""
    file_restores: bool = False
    """True: single files must be restorable, so the VM's policy needs `files:` (checked by plan check)."""
    contacts: str | None = None
    """Who to call about this VM in a disaster (printed in the DR plan)."""
    notes: str | None = None
    """Free text for the DR plan (dependencies, post-restore steps)."""


def _no_password_in_url(url: str | None) -> str | None:
    """A URL in hotvm.yaml never carries a password (the file is copied into every backup's config archive,
    read by operators and shown in errors); the message never repeats the URL."""
    if url is not None and "@" in url:
        try:
            has_password = urlsplit(url).password is not None
        except ValueError:
            has_password = True
        if has_password:
            raise ValueError(
                "holds a password (user:password@ in the URL): remove it; a password goes in an environment "
                "variable (password_env, secret_key_env) or a Prefect Secret block (password_secret)"
            )
    return url


class HostConfig(StrictModel):
    name: str = Field(min_length=1)
    driver: Literal["qemu", "libvirt", "vsphere"] = "qemu"
    uri: str | None = None
    """libvirt: the connection URI (qemu:///system, qemu+ssh://host/system, ...); default qemu:///system."""
    url: str | None = None
    """vSphere: the SDK URL of vCenter or an ESXi host, e.g. https://vc.example.com/sdk."""
    username: str | None = None
    """vSphere: the user name (the password comes from password_env or password_secret, never the file)."""
    password_env: str | None = None
    password_secret: str | None = None
    verify_tls: bool | Path = True
    """vSphere: verify the server certificate (true), do not (false: test labs only), or a CA bundle path."""
    datastore: str | None = None
    """vSphere: datastore restored and standby VMs are placed on (default: the first the host has)."""
    vm_dir: Path | None = None
    """Where restored or standby copies of VMs are placed on this host (disk images, launch specs)."""
    max_concurrent_backups: int = Field(2, ge=1, le=32)
    """Seed: 2-4 concurrent backups per host; enforced with a Prefect global concurrency limit."""
    vms: list[VMConfig] = []
    overlay_dir: Path | None = None
    job_timeout_s: float = Field(6 * 3600, gt=0)
    """A block job (commit) that is not done by then is cancelled and rolled back: never wait forever."""
    on_io_error: Literal["resume", "cancel"] = "cancel"
    """'Answer the question': what to do when a job pauses on an I/O error or the VM stops on one."""

    _urls_without_password = field_validator("uri", "url")(_no_password_in_url)

    @model_validator(mode="after")
    def _unique_vms(self) -> HostConfig:
        names = [vm.name for vm in self.vms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"VM names must be unique on a host, repeated: {', '.join(dupes)}")
        if self.driver == "vsphere":
            missing = [k for k in ("url", "username") if not getattr(self, k)]
            if missing:
                raise ValueError(f"a vsphere host needs {' and '.join(missing)} (see docs/config.md)")
            if not (self.password_env or self.password_secret):
                raise ValueError(
                    "a vsphere host needs password_env (environment variable) or password_secret "
                    "(Prefect Secret block): passwords never go in hotvm.yaml"
                )
        if self.driver == "libvirt" and self.uri is None:
            self.uri = "qemu:///system"
        return self

    @property
    def discovers_vms(self) -> bool:
        """libvirt and vSphere hosts with no `vms:` listed back up every VM the host has."""
        return self.driver != "qemu" and not self.vms

    def vm_list(self) -> list[VMConfig]:
        """The VMs of this host: those listed, or (discovers_vms) every VM the host reports now."""
        if not self.discovers_vms:
            return self.vms
        from hotvm.hypervisors import discover_vms  # lazy: models must not need a hypervisor library

        return [VMConfig(name=name) for name in discover_vms(self)]


class Keep(StrictModel):
    """Retention per VM on a target (hotvm/retention.py): a set stays if any rule keeps it.

    GFS as in borg/restic: `daily: 7` keeps the newest complete set of each of the 7 newest days that have
    one (likewise ISO weeks, months, years); `last` the newest N; `days` every set younger than N days.
    Only complete sets count; the newest complete set of a VM is never removed, whatever the policy."""

    last: int = Field(0, ge=0)
    days: int = Field(0, ge=0)
    daily: int = Field(0, ge=0)
    weekly: int = Field(0, ge=0)
    monthly: int = Field(0, ge=0)
    yearly: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _keeps_something(self) -> Keep:
        if not any((self.last, self.days, self.daily, self.weekly, self.monthly, self.yearly)):
            raise ValueError(
                "keep: give at least one of last, days, daily, weekly, monthly, yearly greater than 0"
            )
        return self

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.model_dump().items() if v)


TABLE_7_3_IMAGE_KEEP = Keep(last=1, days=7)
"""Seed Table 7.3: full VM image weekly, kept one week."""


class TargetConfig(StrictModel):
    name: str = Field(min_length=1)
    url: str = Field(min_length=1)
    default: bool = False
    keep: Keep = TABLE_7_3_IMAGE_KEEP
    """Retention of image backups on this target (`hotvm prune`, the prune deployment)."""
    password_env: str | None = None
    password_secret: str | None = None
    key_file: Path | None = None
    known_hosts: Path | None = None
    endpoint_url: str | None = None
    access_key_env: str | None = None
    secret_key_env: str | None = None
    options: dict[str, str | int | float | bool] = {}
    """Extra keyword arguments for the fsspec filesystem (never secrets: use the *_env / *_secret keys)."""
    encryption_key_env: str | None = None
    """Environment variable holding the repository's encryption passphrase (or base64 of 32 random bytes).
    Set one of encryption_key_env / encryption_key_secret to create an encrypted repository; the key is
    never written to the target: losing it loses the backups (docs/format.md, "Encryption")."""
    encryption_key_secret: str | None = None
    """Prefect Secret block holding the encryption passphrase (instead of encryption_key_env)."""
    immutable_days: float | None = Field(None, gt=0)
    """s3 only: write every object with S3 Object Lock retention for this many days (fractions allowed);
    the bucket must have Object Lock enabled. prune then removes only sets whose lock expired
    (docs/copies.md)."""
    object_lock_mode: Literal["COMPLIANCE", "GOVERNANCE"] = "COMPLIANCE"
    """COMPLIANCE: nobody can shorten or remove the lock; GOVERNANCE: a user allowed
    s3:BypassGovernanceRetention can (keep that permission away from the backup credentials)."""

    @field_validator("url")
    @classmethod
    def _has_scheme_or_path(cls, url: str) -> str:
        if "://" not in url and not url.startswith("/"):
            raise ValueError("give a URL such as file:///srv/backups (or an absolute path)")
        return _no_password_in_url(url)

    _endpoint_without_password = field_validator("endpoint_url")(_no_password_in_url)

    @model_validator(mode="after")
    def _object_lock_on_s3_only(self) -> TargetConfig:
        if self.immutable_days is not None and not self.url.startswith("s3://"):
            raise ValueError(
                "immutable_days needs an s3:// target (S3 Object Lock); make file/SMB/SFTP targets "
                "immutable on the server (docs/copies.md)"
            )
        return self


# --------------------------------------------------------------------------- policies (Table 7.3)

TABLE_7_3_FILES_KEEP = Keep(days=31)
"""Seed Table 7.3: file-level backup daily, kept one month."""
TABLE_7_3_TAPE_KEEP = Keep(days=60)
"""Seed Table 7.3: weekly copy of the image repository to tape, kept two months."""


def _check_cron(expr: str) -> str:
    import datetime as _dt

    from cronsim import CronSim, CronSimError

    try:
        CronSim(expr, _dt.datetime(2026, 1, 1))
    except CronSimError as exc:
        raise ValueError(
            f"invalid cron schedule {expr!r} ({exc}): give 5 fields, minute hour day-of-month month "
            "day-of-week, e.g. \"0 2 * * 6\""
        ) from None
    return expr


class _Scheduled(StrictModel):
    schedule: str

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        return _check_cron(value)


class ImagePolicy(_Scheduled):
    """Weekly full VM image to disk (the weekly-image deployment runs it)."""

    schedule: str = "0 2 * * 6"
    target: str | None = None
    """None: the target marked default (or the only one)."""
    keep: Keep = TABLE_7_3_IMAGE_KEEP
    """Used by prune for this policy's VMs when the target has no `keep:` of its own."""


class FilesPolicy(_Scheduled):
    """Daily file-level backup (the daily-files deployment; docs/files.md): kept one month by default."""

    schedule: str = "0 1 * * *"
    target: str | None = None
    keep: Keep = TABLE_7_3_FILES_KEEP


class TapePolicy(_Scheduled):
    """Weekly copy of the image repository to tape."""

    schedule: str = "0 8 * * 0"
    tape: str = Field(min_length=1)
    keep: Keep = TABLE_7_3_TAPE_KEEP


class CopiesPolicy(StrictModel):
    """What `hotvm plan check` requires besides the primary (3-2-1-1-0, docs/copies.md)."""

    offsite: bool = False
    """A complete copy on another target than the policy's image target (made by `hotvm copy`), no older
    than the RPO."""
    immutable: bool = False
    """A complete set on a target with immutable_days (S3 Object Lock), no older than the RPO."""


class Policy(StrictModel):
    name: str = Field(min_length=1)
    vms: list[str] = Field(["*"], min_length=1)
    """VM names or fnmatch globs ("web*"); a VM belongs to the first policy that matches it."""
    image: ImagePolicy = ImagePolicy()
    files: FilesPolicy | None = None
    tape: TapePolicy | None = None
    rpo: Duration | None = None
    """Most data that may be lost (e.g. 24h): the schedules must protect at least this often."""
    rto: Duration | None = None
    """Longest a restore may take: checked against the newest measured restore (restore --boot-check)."""
    tier: int = Field(3, ge=1)
    """Recovery order: tier 1 is recovered first (`hotvm plan export`)."""
    copies: CopiesPolicy = CopiesPolicy()
    """Copies plan check requires per VM: `{offsite: true, immutable: true}` (docs/copies.md)."""
    quiesce: bool = False
    """Freeze the guest file systems (guest agent / VMware Tools) around add_redo only: an
    application-consistent point instead of a crash-consistent one. Fails the backup if it cannot."""


def default_policy(config: Config) -> Policy:
    """Table 7.3 when hotvm.yaml has no `policies:`: every VM, image weekly to the default target."""
    tapes = getattr(config, "tapes", None) or []
    tape = TapePolicy(tape=tapes[0].name) if len(tapes) == 1 else None
    return Policy(name="default", vms=["*"], image=ImagePolicy(), files=FilesPolicy(), tape=tape)


class TapeConfig(StrictModel):
    """A tape library or drive for tape copies (hotvm/tape, docs/tape.md)."""

    name: str = Field(min_length=1)
    url: str = Field(min_length=1)
    """vtl:///DIR?media=N&capacity=SIZE (file-backed virtual library) or a device path like /dev/nst0."""
    keep: Keep = TABLE_7_3_TAPE_KEEP
    """Tape retention: only `days` applies (a medium is reused once every copy on it is older)."""

    @field_validator("url")
    @classmethod
    def _tape_url(cls, url: str) -> str:
        if not (url.startswith("vtl:///") or url.startswith("/dev/")):
            raise ValueError("give vtl:///DIR?media=N&capacity=SIZE or a tape device like /dev/nst0")
        return url

    @field_validator("keep")
    @classmethod
    def _days_only(cls, keep: Keep) -> Keep:
        if not keep.days or any((keep.last, keep.daily, keep.weekly, keep.monthly, keep.yearly)):
            raise ValueError("tape keep: give days only (e.g. {days: 60}); media expire by age")
        return keep


class PlanConfig(StrictModel):
    """The DR plan document (`hotvm plan export`, the dr-plan deployment)."""

    contacts: list[str] = []
    notes: str | None = None
    export_targets: list[str] | None = None
    """Targets the dr-plan flow writes the plan to (None: every target); pick ones off the protected hosts."""


class TaskRetries(StrictModel):
    retries: int = Field(2, ge=0, le=20)
    retry_delay_s: float = Field(5, ge=0)


class EmailNotification(StrictModel):
    """E-mail over SMTP (accepted in hotvm.yaml; `hotvm notifications apply` refuses it for now:
    Prefect 3.9 ships no SMTP notification block, see docs/notifications.md)."""

    smtp: str = Field(min_length=1)
    """host:port of the SMTP server."""
    sender: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)
    user: str | None = None
    password_env: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NotificationConfig(StrictModel):
    """One notification channel: failed, crashed and late runs reported by the Prefect server itself
    (automations), so a worker that died mid-run is reported too (docs/notifications.md)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=40)
    webhook: str | None = None
    """The URL messages are POSTed to (JSON {"text": ...}, Slack/Mattermost style). A URL holding a token
    is a secret: prefer webhook_env (hotvm.yaml is copied into every backup's config archive)."""
    webhook_env: str | None = None
    """The environment variable (of `hotvm notifications apply`) that holds the webhook URL."""
    email: EmailNotification | None = None
    on: list[Literal["failed", "crashed", "late"]] = Field(
        default=["failed", "crashed", "late"], min_length=1
    )
    late_after: Duration = dt.timedelta(hours=1)
    """late: a scheduled run that has not started this long after the server marked it Late."""

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_is_true(cls, data: object) -> object:
        """YAML 1.1 reads a bare `on:` key as the boolean true."""
        if isinstance(data, dict) and True in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return _no_password_in_url(url)

    @model_validator(mode="after")
    def _one_channel(self) -> NotificationConfig:
        given = [k for k in ("webhook", "webhook_env", "email") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"notification '{self.name}': give exactly one of webhook, webhook_env, email")
        if self.late_after < dt.timedelta(seconds=10):
            raise ValueError(f"notification '{self.name}': late_after must be at least 10s")
        return self


class Config(StrictModel):
    hosts: list[HostConfig] = Field(min_length=1)
    targets: list[TargetConfig] = Field(min_length=1)
    retries: TaskRetries = TaskRetries()
    tapes: list[TapeConfig] = []
    policies: list[Policy] = []
    plan: PlanConfig = PlanConfig()
    """Empty: one default policy (Table 7.3) over every VM; see `effective_policies`."""
    notifications: list[NotificationConfig] = []
    """Failed/crashed/late runs reported by the Prefect server (hotvm notifications apply)."""
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for kind, names in (
            ("host", [h.name for h in self.hosts]),
            ("target", [t.name for t in self.targets]),
            ("tape", [t.name for t in self.tapes]),
            ("notification", [n.name for n in self.notifications]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique, repeated: {', '.join(dupes)}")
        vm_names = [vm.name for h in self.hosts for vm in h.vms]
        dupes = sorted({n for n in vm_names if vm_names.count(n) > 1})
        if dupes:
            raise ValueError(f"VM names must be unique across hosts, repeated: {', '.join(dupes)}")
        if sum(t.default for t in self.targets) > 1:
            raise ValueError("only one target may be marked default: true")
        self._check_policies()
        self._check_plan()
        hosts = {h.name for h in self.hosts}
        for h in self.hosts:
            for vm in h.vms:
                if vm.standby_host is not None and vm.standby_host not in hosts | {h.name}:
                    raise ValueError(
                        f"VM '{vm.name}' standby_host: unknown host '{vm.standby_host}' "
                        f"(configured: {', '.join(sorted(hosts))})"
                    )
                if vm.standby_host == h.name:
                    raise ValueError(f"VM '{vm.name}' standby_host: give another host than its own")
        return self

    def _check_plan(self) -> None:
        targets = {t.name for t in self.targets}
        for name in self.plan.export_targets or []:
            if name not in targets:
                raise ValueError(
                    f"plan.export_targets: unknown target '{name}' (configured: {', '.join(sorted(targets))})"
                )

    def _check_policies(self) -> None:
        names = [p.name for p in self.policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"policy names must be unique, repeated: {', '.join(dupes)}")
        targets = {t.name for t in self.targets}
        tapes = getattr(self, "tapes", None)
        tape_names = None if tapes is None else {t.name for t in tapes}
        for p in self.policies:
            for kind, ref in (("image", p.image), ("files", p.files)):
                if ref is not None and ref.target is not None and ref.target not in targets:
                    raise ValueError(
                        f"policy '{p.name}' {kind}.target: unknown target '{ref.target}' "
                        f"(configured: {', '.join(sorted(targets))})"
                    )
            # Tape names are checked once `tapes:` exists in the config model (the tape-copy work adds it).
            if p.tape is not None and tape_names is not None and p.tape.tape not in tape_names:
                raise ValueError(
                    f"policy '{p.name}' tape.tape: unknown tape '{p.tape.tape}' "
                    f"(configured: {', '.join(sorted(tape_names)) or 'none'})"
                )

    def effective_policies(self) -> list[Policy]:
        return list(self.policies) or [default_policy(self)]

    def find_policy(self, name: str) -> Policy:
        for policy in self.effective_policies():
            if policy.name == name:
                return policy
        known = ", ".join(p.name for p in self.effective_policies())
        raise ConfigError(
            f"unknown policy '{name}' (configured: {known})",
            f"add it under policies: in {self.source or DEFAULT_CONFIG}",
        )

    def find_tape(self, name: str) -> TapeConfig:
        for tape in self.tapes:
            if tape.name == name:
                return tape
        raise ConfigError(
            f"unknown tape '{name}' (configured: {', '.join(t.name for t in self.tapes) or 'none'})",
            f"add it under tapes: in {self.source or DEFAULT_CONFIG}",
        )

    def find_vm(self, name: str) -> tuple[HostConfig, VMConfig]:
        for host in self.hosts:
            for vm in host.vms:
                if vm.name == name:
                    return host, vm
        for host in self.hosts:  # asked only when the name is not listed: no connection for listed VMs
            if host.discovers_vms:
                for vm in host.vm_list():
                    if vm.name == name:
                        return host, vm
        known = ", ".join(vm.name for h in self.hosts for vm in h.vms) or "none"
        if any(h.discovers_vms for h in self.hosts):
            known += " and every VM of " + ", ".join(h.name for h in self.hosts if h.discovers_vms)
        raise UnknownVMError(
            f"unknown VM '{name}' (configured: {known})",
            f"add it under hosts[].vms in {self.source or DEFAULT_CONFIG}",
        )

    def find_host(self, name: str) -> HostConfig:
        for host in self.hosts:
            if host.name == name:
                return host
        raise ConfigError(
            f"unknown host '{name}' (configured: {', '.join(h.name for h in self.hosts)})",
            f"add it under hosts: in {self.source or DEFAULT_CONFIG}",
        )

    def find_target(self, name: str | None = None) -> TargetConfig:
        if name is None:
            defaults = [t for t in self.targets if t.default]
            if defaults:
                return defaults[0]
            if len(self.targets) == 1:
                return self.targets[0]
            raise UnknownTargetError(
                f"targets {', '.join(t.name for t in self.targets)} are configured and none is the default",
                "pass --target NAME or mark one target 'default: true'",
            )
        for target in self.targets:
            if target.name == name:
                return target
        raise UnknownTargetError(
            f"unknown target '{name}' (configured: {', '.join(t.name for t in self.targets)})",
            f"add it under targets: in {self.source or DEFAULT_CONFIG}",
        )


def config_path(path: Path | str | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (check the spelling; see docs/config.md)")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def parse_config(data: object, source: Path | None = None) -> Config:
    where = source or "configuration"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'hosts:' and 'targets:'", "see docs/config.md")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where} is invalid: {_describe_validation_error(exc)}", "fix the file") from None
    config.source = source
    register_config(config)  # its *_env variables are withheld from every child process from now on
    return config


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML silently keeps the last one,
    so a second `hosts:` or `password_env:` would quietly replace the first. Merge keys (<<) still work."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKey(f"duplicate key '{key}' (first given at line {first[key]})", line)
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                pass
        return super().construct_mapping(node, deep)


def load_config(path: Config | Path | str | None = None) -> Config:
    """The configuration from `path` (default: $HOTVM_CONFIG, ./hotvm.yaml); a Config is returned as is, so
    every plain function can take either a path or an already loaded Config."""
    if isinstance(path, Config):
        return path
    source = config_path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {source} not found",
            f"create it (see docs/config.md) or pass --config / set {CONFIG_ENV}",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {source}: {exc.strerror}", "check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})", "save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}:{exc.line}: {exc}", "keep only one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{at}", "fix the indentation or quoting there") from None
    return parse_config(data, source)


# --------------------------------------------------------------------------- backup-set manifest

FORMAT_VERSION = 1
"""Format of an unencrypted repository marker written before repository ids existed (still read)."""
MANIFEST_FORMAT = 2
"""Manifests and disk records of format 2 carry a `checksum` (docs/format.md, "Checksums"); format 1
(older hotvm) has none and is read as legacy."""

BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-z]{1,16}$")
"""What new_backup_id produces (YYYYmmddTHHMMSSZ-xxxx); a caller-chosen suffix (a rerun's id) may be
longer, but only of these characters: a backup id is a path component on the target."""
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 256 << 20
MAX_CHUNKS = 1 << 24
"""Chunk indexes per disk: 64 TiB at the default 4 MiB chunk size (VMDK's limit is 62 TiB)."""
MAX_VIRTUAL_SIZE = 1 << 46
MAX_NAME = 255


def check_backup_id(value: str) -> str:
    if not BACKUP_ID.match(value):
        raise ValueError(f"backup id {value[:80]!r} is not of the form YYYYmmddTHHMMSSZ-xxxx")
    return value


def check_name(value: str, what: str = "name") -> str:
    """A VM or device name read from a manifest: any text a hypervisor may use, but never a path."""
    if not value or len(value) > MAX_NAME:
        raise ValueError(f"{what} must have 1 to {MAX_NAME} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in value) or "/" in value or value in (".", ".."):
        raise ValueError(f"{what} {value[:80]!r} holds a control character or '/', or is '.' or '..'")
    return value


def _checked(check, *args: str):  # noqa: ANN001, ANN202
    return BeforeValidator(lambda v: check(v, *args) if isinstance(v, str) else v)


BackupId = Annotated[str, _checked(check_backup_id)]
VMName = Annotated[str, _checked(check_name, "VM name")]
DeviceName = Annotated[str, _checked(check_name, "device name")]
Sha256Hex = Annotated[str, Field(pattern=SHA256_HEX.pattern)]


class Checksummed(StrictModel):
    """A record that carries the sha256 of its own canonical JSON, so that bit rot in any field of a
    manifest or journal read back from a target is a named error, never wrong data (an encrypted
    repository authenticates the whole file as well; an unencrypted one has only this)."""

    checksum: str | None = None

    def computed_checksum(self) -> str:
        body = json.loads(self.model_dump_json(exclude={"checksum"}))
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_checksum(self):  # noqa: ANN201 - returns the same model type
        return self.model_copy(update={"checksum": self.computed_checksum()})

    def checksum_problem(self, legacy: bool) -> str | None:
        """Why this record cannot be trusted, or None. `legacy`: written by a hotvm without checksums."""
        if self.checksum is None:
            return None if legacy else "its checksum is missing"
        if self.checksum != self.computed_checksum():
            return "its checksum does not match its content (bit rot or tampering)"
        return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StepTiming(StrictModel):
    step: str
    device: str | None = None
    seconds: float


class SkippedDisk(StrictModel):
    device: str
    path: str | None = None
    reason: str


class DiskRecord(Checksummed):
    """One exported disk: the ordered chunk list is the image; zero chunks are simply absent."""

    device: DeviceName
    source_path: str
    source_format: str
    virtual_size: int = Field(ge=0, le=MAX_VIRTUAL_SIZE)
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[tuple[int, Sha256Hex]]
    """(chunk index, sha256 of the uncompressed chunk) for every chunk that is not all zeros."""
    digest: Sha256Hex
    """sha256 over 'index:hash\\n' lines of every chunk (zero chunks as 'index:0'): one value per image."""
    frozen_at: dt.datetime
    bytes_read: int = Field(ge=0)
    bytes_new: int = Field(ge=0)
    """Compressed bytes this export added to the chunk store (chunks already there cost nothing)."""
    export_seconds: float
    pivot_stall_ms: float | None = None
    bitmap: str | None = None
    """QEMU dirty bitmap (on the disk's image node) that tracks changes since this backup's freeze point."""
    incremental_from: str | None = None
    """Backup id whose chunk list this export started from (only chunks its bitmap marked dirty were read);
    None: a full read. Either way `chunks` is the complete image."""
    bytes_reused: int = 0
    """Bytes of non-zero chunks taken from `incremental_from`'s chunk list without reading them."""
    export_mode: str = ""
    """'incremental from <id>' or 'full (<why>)'."""

    @model_validator(mode="after")
    def _geometry(self) -> DiskRecord:
        """Sizes and indexes are bounded by the record's own geometry before anything is allocated."""
        if self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size {self.chunk_size} is not a power of two")
        count = self.chunk_count
        if count > MAX_CHUNKS:
            raise ValueError(f"virtual_size {self.virtual_size} needs {count} chunks (at most {MAX_CHUNKS})")
        previous = -1
        for index, _ in self.chunks:
            if not previous < index < count:
                raise ValueError(
                    f"chunk index {index} is out of order, repeated or beyond the disk's {count} chunks"
                )
            previous = index
        return self

    @property
    def chunk_count(self) -> int:
        return -(-self.virtual_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Plain bytes of chunk `index` (the last one may be short)."""
        return min(self.chunk_size, self.virtual_size - index * self.chunk_size)


class ConfigArchive(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    sha256: Sha256Hex
    size: int = Field(ge=0)
    files: list[str]


class Manifest(Checksummed):
    format_version: int = MANIFEST_FORMAT
    tool_version: str = __version__
    kind: Literal["image"] = "image"
    backup_id: BackupId
    vm: VMName
    host: str
    driver: str
    started_at: dt.datetime
    completed_at: dt.datetime
    chunk_hash: Literal["sha256", "hmac-sha256"] = "sha256"
    """How chunks are named: sha256 of the content, or (encrypted repository) HMAC-SHA256 under its id key."""
    compression: Literal["zstd"] = "zstd"
    disks: list[DiskRecord]
    skipped_disks: list[SkippedDisk] = []
    consistency: Literal["crash", "application"] = "crash"
    """crash: the disks as after a power cut (the seed's hot backup); application: guest file systems
    were frozen (guest agent / VMware Tools quiescing) at the freeze point."""
    config_archive: ConfigArchive | None = None
    vm_description: dict = {}
    boot_check: BootCheckSpec | None = None
    steps: list[StepTiming] = []
    warnings: list[str] = []

    @model_validator(mode="after")
    def _unique_devices(self) -> Manifest:
        devices = [d.device for d in self.disks]
        if len(set(devices)) != len(devices):
            raise ValueError("a device is listed twice")
        return self

    def disk(self, device: str) -> DiskRecord:
        for disk in self.disks:
            if disk.device == device:
                return disk
        raise KeyError(device)
