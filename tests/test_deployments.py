"""prefect.yaml against a real Prefect server: deployments register with their schedules, queues, tags and
required parameters (the routing convention of docs/scale-out.md), and a host's worker runs a hot backup
from a deployment, as the Prefect UI would start it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import write_config
from qemu_helpers import DiskSpec, qemu_img, start_qemu

REPO = Path(__file__).resolve().parent.parent


def prefect(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_deployments_register_and_a_worker_runs_a_backup(prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    prefect("work-pool", "create", "hotvm", "--type", "process", "--overwrite")
    prefect("deploy", "--all")
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert {"weekly-image", "backup-vm", "files-vm", "restore-vm", "backup-host"} <= set(deployments)
        per_vm = {"backup-vm", "files-vm", "restore-vm", "instant-restore", "verify-vm", "recover-vm",
                  "sync-vm"}
        for d in deployments.values():
            if d.work_pool_name != "hotvm":
                continue  # another test's deployment on the shared session server
            assert "hotvm" in d.tags and any(t.startswith("kind:") for t in d.tags), d.name
            if d.name in per_vm:  # no placeholder VM: the Run form asks for it
                assert "vm" not in d.parameters and "vm" in d.parameter_openapi_schema["required"], d.name
                assert d.parameter_openapi_schema["properties"]["vm"]["description"]
            else:
                assert d.work_queue_name == "fleet", d.name
        weekly = deployments["weekly-image"]
        assert [s.schedule.cron for s in weekly.schedules] == ["0 2 * * 6"]  # seed Table 7.3: weekly image
        assert weekly.entrypoint == "flows/backup_policy.py:backup_policy"
        assert weekly.parameters["policy"] == "default"
        assert [s.schedule.cron for s in deployments["prune"].schedules] == ["30 5 * * *"]
        daily = deployments["daily-files"]  # seed Table 7.3: file-level backup daily
        assert [s.schedule.cron for s in daily.schedules] == ["0 1 * * *"]
        assert daily.entrypoint == "flows/daily_files.py:daily_files"
        sync = deployments["sync-config"]  # seed: VMX files synchronized to a standby host, daily
        assert [s.schedule.cron for s in sync.schedules] == ["0 6 * * *"]
        assert sync.entrypoint == "flows/sync_config.py:sync_config"
        offsite = deployments["offsite-copy"]  # 3-2-1-1-0: the daily offsite copy, a fleet-wide run
        assert [s.schedule.cron for s in offsite.schedules] == ["0 4 * * *"]
        assert offsite.entrypoint == "flows/offsite_copy.py:offsite_copy"
        assert (offsite.work_pool_name, offsite.work_queue_name) == ("hotvm", "fleet")
        instant = deployments["instant-restore"]  # docs/instant.md: on the destination host's queue
        assert instant.entrypoint == "flows/instant_restore.py:instant_restore"
        assert instant.work_pool_name == "hotvm" and instant.parameters["wait"] is True

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "32M")
    vm = start_qemu(tmp_path, [DiskSpec("data", tmp_path / "d.qcow2")])
    try:
        vm.qemu_io("data", "write -P 0x33 0 1M")
        config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")
        host = f"h-{tmp_path.name}"  # write_config's host name: the work queue of that host's worker
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(
                deployments["backup-vm"].id,
                parameters={"vm": "web01", "config": str(config)},
                work_queue_name=host,
            )
        prefect("worker", "start", "--pool", "hotvm", "--work-queue", host, "--run-once", timeout=300)
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run.id)
        assert run.state.is_completed() and run.name.startswith(f"backup web01@{host} ")
    finally:
        vm.stop()
    manifests = list((tmp_path / "target" / "vms" / "web01").glob("*/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["disks"][0]["device"] == "data"
