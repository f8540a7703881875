"""`notifications:` of hotvm.yaml as Prefect automation specs (plain data; flows/_setup.py applies them).

Why server-side automations and not a hook in the flow: a hook runs in the worker's process, so a worker
killed mid-run (or a run that never starts) reports nothing. The server sees every state change: a run
marked Crashed because its worker vanished, and a scheduled run that no worker picked up (Late).

Every hotvm deployment tags its runs `hotvm`; the automations match that tag. The message names the run
(`backup web01@hv1 2026-12-05`), the VM, the host (the run's work queue is its host), the failed step (the
`step:` tag a failing per-VM run adds), the error and the run's link in the UI.
"""

from __future__ import annotations

import datetime as dt
import os

from hotvm.config import NotificationConfig
from hotvm.errors import ConfigError

AUTOMATION_PREFIX = "hotvm-"
"""Automations and blocks hotvm owns are named hotvm-<notification>-...: apply replaces exactly those."""

STATE_EVENTS = {"failed": "prefect.flow-run.Failed", "crashed": "prefect.flow-run.Crashed"}
STARTED_EVENTS = [
    "prefect.flow-run.Pending",
    "prefect.flow-run.Running",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Cancelling",
    "prefect.flow-run.Cancelled",
]
"""Anything a run does once a worker has it (or an operator cancelled it): the run is no longer late."""

_HOTVM_RUN = {
    "match": {"prefect.resource.id": "prefect.flow-run.*"},
    "match_related": {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.hotvm"},
}

SUBJECT = "hotvm: {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = """\
{{ flow_run.state.name | upper }}: {{ flow_run.name }}
{% if flow_run.parameters.get('vm') -%}
VM: {{ flow_run.parameters.get('vm') }}
host: {{ flow_run.work_queue_name or '?' }}
step: {% for t in flow_run.tags if t.startswith('step:') %}{{ t[5:] }}{% else %}?{% endfor %}
{% else -%}
fleet run (work queue {{ flow_run.work_queue_name or '?' }}): each failed VM is its own run, reported too
{% endif -%}
error: {{ (flow_run.state.message or '(no message)') | replace('Flow run encountered an exception: ', '') }}
{{ flow_run | ui_url }}"""
LATE_BODY = """\
LATE: {{ flow_run.name }} has not started
VM: {{ flow_run.parameters.get('vm') or '(fleet run)' }}
scheduled for: {{ flow_run.expected_start_time }}
work queue: {{ flow_run.work_queue_name or '?' }} (is its worker running? prefect worker start \
--pool hotvm --work-queue {{ flow_run.work_queue_name }})
{{ flow_run | ui_url }}"""


def human(span: dt.timedelta) -> str:
    """A duration as an operator reads it in the UI: "1 h", "30 min", "1 h 30 min", "10 s", "2 d"."""
    seconds = round(span.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return " ".join(parts) or "0 s"


def block_name(n: NotificationConfig) -> str:
    return f"{AUTOMATION_PREFIX}{n.name}"


def webhook_url(n: NotificationConfig) -> str:
    """The webhook URL, from hotvm.yaml or from the environment variable it names."""
    if n.webhook:
        return n.webhook
    if n.webhook_env:
        url = os.environ.get(n.webhook_env, "")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"notification '{n.name}': environment variable {n.webhook_env} holds no http(s) URL",
                f"export {n.webhook_env}=https://... before `hotvm notifications apply`",
            )
        return url
    raise ConfigError(f"notification '{n.name}' has no webhook", "give webhook: or webhook_env:")


def email_settings(n: NotificationConfig) -> dict:
    """The SMTP settings of an e-mail notification (the fields of the hotvm-email block); the password is
    read from the environment variable `password_env` names, at apply time only."""
    e = n.email
    if e is None:
        raise ConfigError(f"notification '{n.name}' has no email", "give email: {smtp: host:port, ...}")
    host, sep, port = e.smtp.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"notification '{n.name}': smtp must be host:port", "e.g. mail.example.org:587")
    password = None
    if e.password_env:
        password = os.environ.get(e.password_env)
        if not password:
            raise ConfigError(
                f"notification '{n.name}': environment variable {e.password_env} is not set",
                f"export {e.password_env}=... before `hotvm notifications apply`",
            )
    return {
        "smtp_host": host.strip("[]"),
        "smtp_port": int(port),
        "security": e.security,
        "sender": e.sender,
        "to": list(e.to),
        "username": e.user,
        "password": password,
    }


def automation_specs(n: NotificationConfig) -> list[dict]:
    """The automations for one notification: name, description, trigger (Prefect's EventTrigger fields),
    subject and body (Jinja, rendered by the server)."""
    specs = []
    expect = [STATE_EVENTS[o] for o in n.on if o in STATE_EVENTS]
    if expect:
        specs.append(
            {
                "name": f"{AUTOMATION_PREFIX}{n.name}-{'-'.join(o for o in n.on if o in STATE_EVENTS)}",
                "description": f"hotvm: {', '.join(o for o in n.on if o in STATE_EVENTS)} runs to {n.name}",
                "trigger": {
                    "posture": "Reactive",
                    "expect": expect,
                    "threshold": 1,
                    "within": 0,
                    **_HOTVM_RUN,
                },
                "subject": SUBJECT,
                "body": FAILED_BODY,
            }
        )
    if "late" in n.on:
        specs.append(
            {
                "name": f"{AUTOMATION_PREFIX}{n.name}-late",
                "description": f"hotvm: runs not started {human(n.late_after)} after they were due, "
                f"to {n.name}",
                "trigger": {
                    "posture": "Proactive",
                    "after": ["prefect.flow-run.Late"],
                    "expect": STARTED_EVENTS,
                    "for_each": ["prefect.resource.id"],
                    "threshold": 1,
                    "within": n.late_after.total_seconds(),
                    **_HOTVM_RUN,
                },
                "subject": "hotvm: {{ flow_run.name }} is late",
                "body": LATE_BODY,
            }
        )
    return specs


TEST_SUBJECT = "hotvm: test message"


def test_body(n: NotificationConfig, ui_url: str | None) -> str:
    return (
        f"This is a test of hotvm notification '{n.name}' (on: {', '.join(n.on)}). "
        f"Failed and crashed hotvm runs{' and late ones' if 'late' in n.on else ''} are reported here."
        + (f"\n{ui_url}" if ui_url else "")
    )
