"""`hotvm vm ...`: the tiny demo guest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotvm.cli._common import JsonOpt
from hotvm.cli._output import emit, out

vm_app = typer.Typer(
    help="The tiny demo guest: a real Linux VM that keeps writing to its data disk.", no_args_is_help=True
)
StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="where demo VMs live (default .hotvm/vms)")
]


def _vm_row(vm) -> dict:  # noqa: ANN001 - hotvm.guest.VMStatus
    return {
        "name": vm.name,
        "running": vm.running,
        "pid": vm.pid,
        "qmp": str(vm.qmp),
        "disk": str(vm.disk),
        "format": vm.fmt,
        "serial_log": str(vm.serial_log),
        "accel": vm.accel,
    }


@vm_app.command("create")
def vm_create(
    name: str,
    size: Annotated[str, typer.Option("--size", help="data disk size, e.g. 64M, 1G")] = "64M",
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw")] = "qcow2",
    state_dir: StateOpt = None,
    agent: Annotated[
        bool, typer.Option("--agent", help="with qemu-ga and an ext4 disk to quiesce (docs/standby.md)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a demo VM (kernel + busybox initramfs + data disk) and print its hotvm.yaml entry."""
    import yaml

    from hotvm import guest

    vm = guest.create_vm(name, data_size=size, fmt=fmt, state_dir=state_dir, agent=agent)
    entry = guest.vm_config_entry(name, state_dir=state_dir)

    def render(entry: dict) -> None:
        out.print(f"created {name} in {vm.dir}; start it with: hotvm vm start {name}")
        out.print("add it to hotvm.yaml under hosts[].vms:")
        out.print(yaml.safe_dump([entry], sort_keys=False), markup=False)

    emit(entry, as_json, render)


@vm_app.command("start")
def vm_start(name: str, state_dir: StateOpt = None, wait: bool = True, as_json: JsonOpt = False) -> None:
    """Boot a demo VM (daemonized); waits until the guest is up and writing."""
    from hotvm import guest

    vm = guest.start_vm(name, state_dir=state_dir)
    if wait:
        guest.wait_ready(name, timeout=180, state_dir=state_dir)
    emit(
        _vm_row(guest.get_vm(name, state_dir)),
        as_json,
        lambda r: out.print(
            f"{name} running (pid {r['pid']}, {r['accel']}), QMP {r['qmp']}, console {vm.serial_log}"
        ),
    )


@vm_app.command("stop")
def vm_stop(name: str, state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Shut a demo VM down (QMP quit, then signals)."""
    from hotvm import guest

    was_running = guest.stop_vm(name, state_dir=state_dir)
    emit(
        {"name": name, "was_running": was_running},
        as_json,
        lambda r: out.print(f"{name} {'stopped' if was_running else 'was not running'}"),
    )


@vm_app.command("list")
def vm_list(state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """The demo VMs and whether they run."""
    from hotvm import guest

    rows = [_vm_row(vm) for vm in guest.list_vms(state_dir)]

    def render(rows: list[dict]) -> None:
        table = Table("name", "state", "pid", "disk", "qmp")
        for r in rows:
            table.add_row(
                r["name"], "running" if r["running"] else "stopped", str(r["pid"] or ""), r["disk"], r["qmp"]
            )
        out.print(table)

    emit(rows, as_json, render)
