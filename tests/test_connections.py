"""No command, task or flow leaves a connection open to a network target.

Each test runs a sequence of CLI commands in this process (as a Prefect worker or a long `hotvm` run
would: a leaked connection stays open as long as the process) against a real server on loopback, backing
up a real QEMU VM, plus one flow called directly, then counts the TCP connections the server still has
established: back to what it had before. A command that fails (no such VM) closes its connection too.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from qemu_helpers import DiskSpec, random_raw
from test_targets import env, ftp_server, make_config, smb_server, ssh_server  # noqa: F401 - fixtures
from typer.testing import CliRunner

MiB = 1 << 20


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is `port`: the server's side of each one."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def settled(port: int, expected: int, timeout: float = 10.0) -> int:
    """The count once it reached `expected` (a server closes its side a moment after the client), or the
    count at the timeout."""
    deadline = time.monotonic() + timeout
    while (now := established(port)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def cli(*args: str, code: int = 0) -> str:
    from hotvm.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, f"hotvm {' '.join(args)} -> {result.exit_code}:\n{result.output}" + (
        f"\n{result.exception!r}" if result.exception and code == 0 else ""
    )
    return result.output


@pytest.mark.parametrize("scheme", ["sftp", "ftp", "smb"])
def test_commands_and_flows_close_their_connections(
    scheme: str, request, prefect_server, qemu, tmp_path: Path, env  # noqa: F811 - the fixture
) -> None:
    made = env(make_config(scheme, request, tmp_path))
    port = made.server.port
    vm = qemu([DiskSpec("data", random_raw(tmp_path / "data.raw", 16 * MiB, 4 * MiB), format="raw")])
    target = made.config.model_copy(update={"name": "nas"}).model_dump(mode="json", exclude_defaults=True)
    config = tmp_path / "hotvm.yaml"
    config.write_text(yaml.safe_dump({
        "hosts": [{"name": f"h-{tmp_path.name}", "vms": [{"name": "web01", "qmp": str(vm.qmp_path)}]}],
        "targets": [target],
    }))  # fmt: skip
    c = str(config)
    before = established(port)

    cli("list", "-c", c)
    cli("backup", "web01", "-c", c, "--json")  # the weekly-image flow, in this process
    assert "web01" in cli("list", "-c", c, "--json")
    cli("check", "-c", c)
    cli("verify", "web01", "-c", c, "--json")  # restore-test flow: scratch restore, record beside the set
    cli("restore", "web01", "--to", str(tmp_path / "restored"), "--format", "raw", "-c", c, "--json")
    cli("restore", "no-such-vm", "--to", str(tmp_path / "nothing"), "-c", c, code=1)  # fails: still closed
    cli("files", "ls", "web01", "-c", c, "--json", code=1)  # no file-level backup: fails, still closed
    cli("prune", "--keep-last", "1", "-c", c, "--json")

    from flows.verify import scrub

    assert scrub(target="nas", config=c)["ok"]

    left = settled(port, before) - before
    assert left == 0, f"{left} connection(s) left open to the {scheme} server"
