"""Every per-VM run is a new Python process (a worker starts one per VM, docs/scale-out.md), so what its
flow module imports is paid 50 times for 50 VMs: the drivers and targets a run does not use stay unimported
until a run needs them (hypervisor SDKs, SMB/SFTP/S3 clients, the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PER_VM_FLOWS = ["flows.backup_vm", "flows.daily_files", "flows.restore_vm", "flows.verify", "flows.recover",
                "flows.sync_config"]  # fmt: skip
NOT_AT_START = ["pyVmomi", "libvirt", "smbprotocol", "smbclient", "paramiko", "asyncssh", "s3fs", "botocore",
                "typer", "hotvm.cli"]  # fmt: skip


def test_a_per_vm_run_process_imports_no_driver_or_target_library_it_does_not_use() -> None:
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in PER_VM_FLOWS)
        + f"print(json.dumps([m for m in {NOT_AT_START!r} if m in sys.modules]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
