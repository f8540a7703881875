"""`hotvm target forget`: what this host remembers of each target's repository."""

from __future__ import annotations

from typing import Annotated

import typer

from hotvm.cli._common import ConfigOpt, config_str
from hotvm.cli._output import err

target_app = typer.Typer(help="What this host remembers of each target's repository.", no_args_is_help=True)


@target_app.command("forget")
def target_forget_cmd(
    name: Annotated[str, typer.Argument(help="target name from hotvm.yaml")], config: ConfigOpt = None
) -> None:
    """Forget the repository identity remembered for a target (after re-creating it on purpose): the next
    run takes whatever repository it finds there, or creates one, as on first use."""
    from hotvm.config_file import load_config
    from hotvm.formats.identity import IdentityStore, location_of

    target = load_config(config_str(config)).find_target(name)
    location = location_of(target.url, target.endpoint_url)  # no connection needed
    if IdentityStore().forget(location):
        err.print(f"forgot the repository identity of target '{name}' ({location})")
    else:
        err.print(f"nothing remembered for target '{name}' ({location})")
