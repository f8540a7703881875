"""hotvm command line: parse, call a flow or the core, print a rich table or --json. Nothing else.

One module per command group (`<group>_cmd.py`, as borg's archiver/); the shared options live in `_common`,
output and the error exits in `_output`. This module builds the app: the global options, then every command
in help order.
"""

from __future__ import annotations

import os

import typer

from hotvm.cli import (
    backup_cmd,
    check_cmd,
    copy_cmd,
    inventory_cmd,
    list_cmd,
    prune_cmd,
    restore_cmd,
    standby_cmd,
    status_cmd,
    verify_cmd,
)
from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, shared_defaults
from hotvm.cli._output import fail_and_exit
from hotvm.cli.files_cmd import files_app
from hotvm.cli.plan_cmd import plan_app
from hotvm.cli.prefect_cmd import notifications_app, prefect_app
from hotvm.cli.tape_cmd import tape_app
from hotvm.cli.target_cmd import target_app
from hotvm.cli.vm_cmd import vm_app
from hotvm.errors import HotvmError

app = typer.Typer(
    help="Hot backups of running VMs (layered REDO overlays), run as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def shared_options(
    ctx: typer.Context,
    config: ConfigOpt = None,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    # Given before the subcommand, as for git, restic and borg: each becomes the default of that option in
    # whichever subcommand takes it (given after the subcommand, it wins).
    given = {"config": config, "target": target, "as_json": as_json, "verbose": verbose}
    given = {k: str(v) if k == "config" else v for k, v in given.items() if v}
    ctx.default_map = shared_defaults(ctx.command, given)


app.command()(backup_cmd.backup)
app.command()(restore_cmd.restore)
app.command("sync-config")(standby_cmd.sync_config_cmd)
app.command("list")(list_cmd.list_backups)
app.command("copy")(copy_cmd.copy_cmd)
app.command()(status_cmd.status)
app.command()(prune_cmd.prune)
app.command()(check_cmd.check)
app.command()(verify_cmd.verify)
app.command()(verify_cmd.recover)
app.command("inventory")(inventory_cmd.inventory_cmd)
app.add_typer(vm_app, name="vm")
app.add_typer(tape_app, name="tape")
app.add_typer(plan_app, name="plan")
app.add_typer(target_app, name="target")
app.add_typer(files_app, name="files")
app.add_typer(prefect_app, name="prefect")
app.add_typer(notifications_app, name="notifications")


def main() -> None:
    try:
        app()
    except HotvmError as exc:
        fail_and_exit(exc)
    except RuntimeError as exc:
        if "Failed to reach API" not in str(exc):
            raise
        fail_and_exit(
            HotvmError(
                f"cannot reach the Prefect server at {os.environ.get('PREFECT_API_URL')}",
                "start it (prefect server start), or unset PREFECT_API_URL to use the embedded one",
            )
        )
