"""The hotvm.yaml configuration as typed data: hosts, VMs, targets, policies, tapes, notifications.

Pure data on purpose: no discovery, no hypervisor imports, no I/O (reading the file is config_file.py;
finding the VMs a host has now is hotvm.hypervisors.resolve). Validation errors name the key path and
the fix, because a backup that silently runs with a mistyped option is worse than one that refuses to start.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from hotvm.errors import ConfigError, UnknownTargetError

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
    tapes = config.tapes
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
    """E-mail over SMTP, sent by the Prefect server through hotvm's `hotvm-email` block
    (flows/email_block.py, docs/notifications.md)."""

    smtp: str = Field(min_length=1)
    """host:port of the SMTP server."""
    sender: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)
    user: str | None = None
    password_env: str | None = None
    """The environment variable (of `hotvm notifications apply`) holding the SMTP password."""
    security: Literal["starttls", "ssl", "none"] = "starttls"
    """starttls (port 587), ssl (port 465) or none (a relay on loopback / a trusted network only)."""

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
        tape_names = {t.name for t in self.tapes}
        for p in self.policies:
            for kind, ref in (("image", p.image), ("files", p.files)):
                if ref is not None and ref.target is not None and ref.target not in targets:
                    raise ValueError(
                        f"policy '{p.name}' {kind}.target: unknown target '{ref.target}' "
                        f"(configured: {', '.join(sorted(targets))})"
                    )
            if p.tape is not None and p.tape.tape not in tape_names:
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

    def listed_vm(self, name: str) -> tuple[HostConfig, VMConfig] | None:
        """The VM `name` as listed under hosts[].vms, or None; a discovering host's VMs are found by
        hotvm.hypervisors.resolve (the config itself never connects to anything)."""
        for host in self.hosts:
            for vm in host.vms:
                if vm.name == name:
                    return host, vm
        return None

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
