"""`hotvm tape copy|list`: tape copies of the image repository."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import ConfigOpt, JsonOpt, TargetOpt, VerboseOpt, config_str, prefect_env
from hotvm.cli._output import emit, out

tape_app = typer.Typer(help="Tape copies of the image repository (seed Table 7.3).", no_args_is_help=True)
TapeOpt = Annotated[str, typer.Option("--tape", help="tape name from hotvm.yaml (tapes:)")]


@tape_app.command("copy")
def tape_copy_cmd(
    tape: TapeOpt,
    vms: Annotated[list[str] | None, typer.Argument(help="only these VMs (default: every VM)")] = None,
    target: TargetOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Copy the complete backup sets of a target to tape as one new, self-contained copy (tape-copy flow)."""
    prefect_env(verbose)
    from flows.tape_copy import artifact_rows, tape_copy

    result = tape_copy(tape=tape, target=target, vms=vms or None, config=config_str(config))

    def render(result: dict) -> None:
        table = Table("vm", "backup", "where", "MiB", "chunks", "sha256")
        for r in artifact_rows(result):
            table.add_row(r["vm"], r["backup"], r["where"], str(r["MiB"]), str(r["chunks"]), r["sha256"])
        out.print(table)
        out.print(
            f"[bold green]tape copy {result['copy_id']}[/] of '{result['target']}' on "
            f"{', '.join(result['media'])}, expires {result['expires'][:16]}; "
            f"catalog: {result['catalog_path']}"
        )

    emit(result, as_json, render)


@tape_app.command("list")
def tape_list_cmd(tape: TapeOpt, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Read every medium of the tape forward: labels, files, the sets on it and when it expires."""
    from hotvm.tape import media_rows, open_tape
    from hotvm.tape.copy import catalogs_from_scan, scan_library

    library = open_tape(config, tape)
    states = scan_library(library)
    rows = media_rows(library, states, catalogs_from_scan(states))

    def render(rows: list[dict]) -> None:
        table = Table("medium", "copies", "files", "sets", "expires", "free")
        for r in rows:
            kinds = ", ".join(f"{f['file']}:{f['kind']}" for f in r["files"]) or "blank"
            free = f"{r['free_bytes'] >> 20} MiB" if r["free_bytes"] is not None else "?"
            copies = ", ".join(r["copies"]) + (" (incomplete: " + ", ".join(r["incomplete_copies"]) + ")"
                                              if r["incomplete_copies"] else "")
            table.add_row(r["medium"], copies, kinds, "\n".join(r["sets"]), r["expires"] or "reusable", free)
        out.print(table)

    emit(rows, as_json, render)
