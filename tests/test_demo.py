"""`make demo` end to end on the real guest: hot backup while it writes, restore, data check, boot check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.guest
def test_demo_backs_up_a_writing_guest_restores_and_boots_it(prefect_server, tmp_path: Path) -> None:
    env = {**os.environ, "HOTVM_DEMO_DIR": str(tmp_path / "demo")}
    proc = subprocess.run(
        [sys.executable, "-m", "hotvm.demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    result = json.loads((tmp_path / "demo" / "demo-result.json").read_text())
    assert result["static_data_ok"] and result["ring"]["consistent"] and result["tape_restore_identical"]
    assert result["restore"]["boot_check"]["ok"]
    backup_id = result["backup"]["backup_id"]
    tests = list(
        (tmp_path / "demo" / "backups" / "vms" / "demo" / backup_id / "restore-tests").glob("*.json")
    )
    assert len(tests) == 1 and json.loads(tests[0].read_text())["boot_check"]["seconds"] > 0
    assert result["backup"]["pivot_stall_ms"] is not None
    assert not any((tmp_path / "demo" / "vms").rglob("*.hotvm-redo-*"))
