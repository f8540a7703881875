"""The Prefect side of the routing convention and of notifications, created idempotently from hotvm.yaml.

    setup()               pool `hotvm` (process), a work queue per host of hotvm.yaml + `fleet`, each
                          host's concurrency limit, then apply_notifications()
    apply_notifications() a webhook or e-mail block and automations per `notifications:` entry;
                          hotvm-* automations no longer in the config are removed
    send_test()           one message through a notification's saved block

Called by `hotvm prefect setup` / `hotvm notifications apply|test` (hotvm/cli/prefect_cmd.py).
"""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flows._limits import ensure_host_limit
from flows._runs import FLEET_QUEUE, POOL
from hotvm.config import Config, NotificationConfig
from hotvm.config_file import load_config
from hotvm.errors import ConfigError
from hotvm.notifications import (
    AUTOMATION_PREFIX,
    TEST_SUBJECT,
    automation_specs,
    block_name,
    email_settings,
    test_body,
    webhook_url,
)


def setup(config: str | Config | None = None) -> dict:
    """Everything the deployments and workers of prefect.yaml expect on the server. Safe to rerun."""
    cfg = load_config(config)
    queues = [h.name for h in cfg.hosts] + [FLEET_QUEUE]
    if FLEET_QUEUE in queues[:-1]:
        raise ConfigError(
            f"a host is named '{FLEET_QUEUE}'", "rename it: that work queue runs fleet-wide flows"
        )
    with get_client(sync_client=True) as client:
        created_pool = _ensure_pool(client)
        created = [q for q in queues if _ensure_queue(client, q)]
    for h in cfg.hosts:
        ensure_host_limit(h.name, h.max_concurrent_backups)
    limits = {h.name: h.max_concurrent_backups for h in cfg.hosts}
    return {
        "pool": POOL,
        "pool_created": created_pool,
        "queues": queues,
        "queues_created": created,
        "limits": limits,
        "notifications": apply_notifications(cfg),
    }


def _ensure_pool(client) -> bool:  # noqa: ANN001 - SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(POOL)
        return False
    except ObjectNotFound:
        pass
    try:
        client.create_work_pool(
            WorkPoolCreate(
                name=POOL,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="hotvm: one work queue per hypervisor host, `fleet` for fleet-wide runs",
            )
        )
    except ObjectAlreadyExists:
        return False
    return True


def _ensure_queue(client, name: str) -> bool:  # noqa: ANN001 - SyncPrefectClient
    try:
        client.create_work_queue(
            name=name,
            work_pool_name=POOL,
            description="fleet-wide hotvm runs" if name == FLEET_QUEUE else f"hotvm runs of host {name}",
        )
    except ObjectAlreadyExists:
        return False
    return True


def apply_notifications(config: str | Config | None = None) -> list[dict]:
    """A block and automations per notification; stale hotvm-* automations removed. Safe to rerun."""
    from prefect.automations import AutomationCore
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger

    cfg = load_config(config)
    applied, wanted = [], set()
    with get_client(sync_client=True) as client:
        for n in cfg.notifications:
            block_id = _save_block(n)
            for spec in automation_specs(n):
                wanted.add(spec["name"])
                automation = AutomationCore(
                    name=spec["name"],
                    description=spec["description"],
                    enabled=True,
                    tags=["hotvm"],
                    trigger=EventTrigger(**spec["trigger"]),
                    actions=[
                        SendNotification(
                            block_document_id=block_id, subject=spec["subject"], body=spec["body"]
                        )
                    ],
                )
                existing = client.read_automations_by_name(spec["name"])
                if existing:
                    client.update_automation(existing[0].id, automation)
                    for extra in existing[1:]:
                        client.delete_automation(extra.id)
                else:
                    client.create_automation(automation)
                applied.append({"notification": n.name, "automation": spec["name"]})
        for automation in client.read_automations():
            if automation.name.startswith(AUTOMATION_PREFIX) and automation.name not in wanted:
                client.delete_automation(automation.id)
                applied.append({"notification": None, "automation": automation.name, "removed": True})
    return applied


def _save_block(n: NotificationConfig):  # noqa: ANN202 - the block document id
    """The notification's block: a webhook (its URL kept as a block secret, shown masked) or hotvm's
    e-mail block (its password a secret field)."""
    if n.email is not None:
        from flows.email_block import HotvmEmail

        HotvmEmail.register_type_and_schema()  # the server learns the block type (idempotent)
        return HotvmEmail(**email_settings(n)).save(block_name(n), overwrite=True)
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=block_name(n),
        url="{{webhook_url}}",
        method="POST",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
        secrets={"webhook_url": webhook_url(n)},
        timeout=10,
    )
    return block.save(block_name(n), overwrite=True)


def send_test(config: str | Config | None, name: str) -> str:
    """One test message through the saved block of notification `name` (apply it first)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_UI_URL

    from flows.email_block import HotvmEmail

    cfg = load_config(config)
    found = [n for n in cfg.notifications if n.name == name]
    if not found:
        known = ", ".join(n.name for n in cfg.notifications) or "none"
        raise ConfigError(f"no notification '{name}' in hotvm.yaml (configured: {known})", "check the name")
    try:
        kind = HotvmEmail if found[0].email is not None else CustomWebhookNotificationBlock
        block = kind.load(block_name(found[0]))
    except ValueError as exc:
        raise ConfigError(
            f"notification '{name}' is not applied on the Prefect server", "run `hotvm notifications apply`"
        ) from exc
    with block.raise_on_failure():  # the person testing wants to see why it did not arrive
        block.notify(test_body(found[0], PREFECT_UI_URL.value()), subject=TEST_SUBJECT)
    return block_name(found[0])
