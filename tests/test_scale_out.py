"""Scale-out (docs/scale-out.md): scripts/prefect-server.sh starts PostgreSQL, a Prefect server on it, the
process work pool and the deployments; a worker runs `backup-vm` from its deployment; a failed run retried
through the API is picked up by the worker again and skips the steps that completed.

This test has its own PostgreSQL and Prefect server (not the session `prefect_server`): every subprocess
gets an explicit environment pointing at them, and this process talks to them only inside
`temporary_settings`, so the settings the other tests use stay as they were."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import hotvm_json, write_config
from qemu_helpers import DiskSpec, start_qemu
from servers import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "prefect-server.sh"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (PG_BIN / "initdb").exists() or os.geteuid() != 0,
    reason="needs Debian's postgresql (scripts/install-system-deps.sh) and root (tmpfs, postgres user)",
)


def random_raw(path: Path, size: int, data_bytes: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(os.urandom(data_bytes))
    return path


class Stack:
    """The script's environment: a temp dir (traversable by the postgres user), free ports."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hotvm-scale-out-"))
        os.chmod(self.dir, 0o755)
        self.api_url = f"http://127.0.0.1:{(api_port := free_port())}/api"
        self.env = {
            **os.environ,
            "HOTVM_PG_DATA": str(self.dir / "pg"),
            "HOTVM_PG_PORT": str(free_port()),
            "HOTVM_PREFECT_PORT": str(api_port),
            "HOTVM_STATE_DIR": str(self.dir / "state"),
            "PREFECT_HOME": str(self.dir / "prefect-home"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT": str(Path(sys.executable).with_name("prefect")),
        }
        self.env.pop("HOTVM_PG_PASSWORD", None)

    def script(self, *args: str) -> str:
        proc = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=180,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"prefect-server.sh {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def prefect(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert not check or proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def worker_run_once(self, config: Path) -> None:
        """One poll of the host's queue, as the host's worker would do it: it runs what is scheduled, then
        exits. The host is write_config's (h-<test dir>)."""
        env = {**self.env, "HOTVM_CONFIG": str(config)}
        subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "hotvm", "--work-queue",
                        f"h-{config.parent.name}", "--run-once"], cwd=REPO, env=env, capture_output=True,
                       timeout=240, stdin=subprocess.DEVNULL)  # fmt: skip

    def client(self):  # noqa: ANN201
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)


@pytest.fixture
def stack():
    s = Stack()
    try:
        yield s
    finally:
        s.script("stop")  # workers, then the server, then PostgreSQL
        shutil.rmtree(s.dir, ignore_errors=True)


def test_postgres_server_worker_run_a_deployment_and_a_retried_run_resumes(
    stack: Stack, small_tmpfs: Path, tmp_path: Path
) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = stack.script("start")
    assert "worker start --pool hotvm --work-queue fleet" in out
    assert "already" in stack.script("start")  # rerun = reuse
    pg = subprocess.run(  # the server's data really is in PostgreSQL
        ["runuser", "-u", "postgres", "--", str(PG_BIN / "psql"), "-h", stack.env["HOTVM_PG_DATA"], "-p",
         stack.env["HOTVM_PG_PORT"], "-U", "postgres", "-d", "prefect", "-tAc",
         "SELECT name FROM deployment ORDER BY name"],
        capture_output=True, text=True, check=True,
    )
    assert {"backup-vm", "restore-vm", "weekly-image", "prune"} <= set(pg.stdout.split())

    a = random_raw(tmp_path / "a.raw", 16 * MiB, 4 * MiB)
    b = random_raw(tmp_path / "b.raw", 32 * MiB, 24 * MiB)
    vm = start_qemu(tmp_path, [DiskSpec("a", a, format="raw"), DiskSpec("b", b, format="raw")])
    try:
        with temporary_settings({PREFECT_API_URL: stack.api_url}), stack.client() as client:
            deployment = client.read_deployment_by_name("backup-vm/backup-vm")
            host = f"h-{tmp_path.name}"  # write_config's host: the work queue of its worker

            # 1. a run from the deployment, picked up by the host's worker: a complete set on the target
            config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/nas")
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"vm": "web01", "config": str(config)}, work_queue_name=host
            )
            stack.worker_run_once(config)
            assert client.read_flow_run(run.id).state.is_completed()
            sets = hotvm_json("list", "--config", str(config))
            assert [s["complete"] for s in sets] == [True] and sorted(sets[0]["disks"]) == ["a", "b"]

            # 2. the target fills up during disk b: the run fails; retried through the API after room is
            # made, the worker runs it again, and disk a (done before the failure) is not read again
            full = write_config(tmp_path / "full.yaml", {"web01": vm.qmp_path}, f"file://{small_tmpfs}/repo")
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"vm": "web01", "config": str(full)}, work_queue_name=host
            )
            stack.worker_run_once(full)
            assert client.read_flow_run(run.id).state.is_failed()
            subprocess.run(["mount", "-o", "remount,size=96m", str(small_tmpfs)], check=True)
            stack.prefect("flow-run", "retry", str(run.id))
            assert client.read_flow_run(run.id).state.is_scheduled()
            stack.worker_run_once(full)
            assert client.read_flow_run(run.id).state.is_completed()
            this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            task_runs = client.read_task_runs(flow_run_filter=this_run)
        exports = sorted((r.name, r.state.type.value) for r in task_runs if r.name.startswith("export "))
        assert exports.count(("export a", "COMPLETED")) == 1  # a was not read again on the retry
        assert [n for n, _ in exports].count("export b") == 2  # b failed, then completed
        sets = hotvm_json("list", "--config", str(full))
        assert [s["complete"] for s in sets] == [True] and sorted(sets[0]["disks"]) == ["a", "b"]
    finally:
        vm.stop()
