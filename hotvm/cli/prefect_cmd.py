"""`hotvm prefect setup` and `hotvm notifications apply|test`: the Prefect server side of hotvm.yaml.

Both talk to the server at PREFECT_API_URL (the one the UI, the workers and `prefect deploy` use); the
embedded server would forget everything at exit, so they refuse to run without it.
"""

from __future__ import annotations

import os

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, config_str, prefect_env
from hotvm.cli._output import emit, out
from hotvm.errors import HotvmError

prefect_app = typer.Typer(help="The Prefect server side: work pool, queues, limits.", no_args_is_help=True)
notifications_app = typer.Typer(
    help="Failed, crashed and late runs reported by the Prefect server (notifications: in hotvm.yaml).",
    no_args_is_help=True,
)


def _server() -> None:
    prefect_env()
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise HotvmError(
                "no Prefect server configured (PREFECT_API_URL is not set)",
                "start one (make server, or prefect server start) and export PREFECT_API_URL=http://HOST:4200/api",
            )


@prefect_app.command("setup")
def setup_cmd(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Create work pool `hotvm`, a work queue per host of hotvm.yaml plus `fleet`, each host's concurrency
    limit, and the notifications (idempotent: rerun after editing hotvm.yaml). Then: prefect deploy --all."""
    _server()
    from flows._setup import setup

    result = setup(config_str(config))

    def render(r: dict) -> None:
        out.print(f"work pool [bold]{r['pool']}[/] ({'created' if r['pool_created'] else 'exists'})")
        for q in r["queues"]:
            state = "created" if q in r["queues_created"] else "exists"
            out.print(
                f"  work queue [bold]{q}[/] ({state}): "
                f"prefect worker start --pool {r['pool']} --work-queue {q}"
            )
        for host, limit in r["limits"].items():
            out.print(f"  host {host}: at most {limit} backups at once (global concurrency limit)")
        _render_notifications(r["notifications"])
        out.print("next: prefect --no-prompt deploy --all  (from the hotvm checkout)")

    emit(result, as_json, render)


@notifications_app.command("apply")
def apply_cmd(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Turn notifications: into Prefect notification blocks and server-side automations (idempotent)."""
    _server()
    from flows._setup import apply_notifications

    emit(apply_notifications(config_str(config)), as_json, _render_notifications)


@notifications_app.command("test")
def test_cmd(name: str, config: ConfigOpt = None) -> None:
    """Send one test message through notification NAME (as applied on the server)."""
    _server()
    from flows._setup import send_test

    block = send_test(config_str(config), name)
    out.print(f"test message sent through {block}")


def _render_notifications(rows: list[dict]) -> None:
    if not rows:
        out.print("no notifications: in hotvm.yaml")
        return
    table = Table("notification", "automation", "")
    for r in rows:
        table.add_row(r["notification"] or "", r["automation"], "removed" if r.get("removed") else "applied")
    out.print(table)
