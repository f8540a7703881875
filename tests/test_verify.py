"""Restore tests (verify, scrub) and recovery by tier, on real backups of running QEMU VMs."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import yaml
from helpers import hotvm, write_config
from qemu_helpers import DiskSpec, qemu_img

MiB = 1 << 20


def _records(target: Path, vm: str, backup_id: str) -> list[dict]:
    files = sorted((target / "vms" / vm / backup_id / "restore-tests").glob("*.json"))
    return [json.loads(f.read_text()) for f in files]


def _backup_bare(qemu, tmp_path: Path, vm_name: str = "web01", **host: object) -> tuple[Path, dict]:  # noqa: ANN001
    from flows.backup_vm import backup_vm

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "data.qcow2"), "32M")
    vm = qemu([DiskSpec("data", tmp_path / "data.qcow2")])
    vm.qemu_io("data", f"write -P 0x5a 0 {2 * MiB}")
    config = write_config(
        tmp_path / "hotvm.yaml", {vm_name: vm.qmp_path}, f"file://{tmp_path}/target", **host
    )
    return config, backup_vm(vm=vm_name, config=str(config))


def test_verify_passes_then_names_a_corrupted_chunk_and_marks_the_set(
    prefect_server, qemu, tmp_path: Path
) -> None:
    config, backup = _backup_bare(qemu, tmp_path)
    target = tmp_path / "target"
    backup_id = backup["backup_id"]

    proc = hotvm("verify", "web01", "--config", str(config), "--json")
    [result] = json.loads(proc.stdout)
    assert result["verified"] and result["problems"] == [] and result["mode"] == "checksums"
    assert result["backup_id"] == backup_id and result["restore_seconds"] > 0
    assert result["seconds_to_ready"] >= result["restore_seconds"]
    assert result["scratch"] is None  # the scratch restore is gone
    [record] = _records(target, "web01", backup_id)
    assert record["verified"] is True and record["seconds_to_ready"] > 0

    from hotvm.formats.opener import open_repository
    from hotvm.verify import set_verified, vms_to_verify

    with open_repository(str(config)) as repo:
        assert set_verified(repo, "web01", backup_id) is True
    assert vms_to_verify(str(config), None) == vms_to_verify(str(config), None, sample=1) == ["web01"]

    # damage one chunk of the data disk on the target (bit rot)
    manifest = json.loads((target / "vms" / "web01" / backup_id / "manifest.json").read_text())
    index, digest = manifest["disks"][0]["chunks"][0]
    [chunk] = list((target / "chunks").rglob(digest + "*"))
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk.write_bytes(bytes(blob))

    proc = hotvm("verify", "web01", "--config", str(config), "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    [bad] = json.loads(proc.stdout)
    assert not bad["verified"]
    assert any(f"chunk {index} of disk 'data'" in p for p in bad["problems"]), bad["problems"]
    assert "chunk" in proc.stderr and "failed" in proc.stderr
    records = _records(target, "web01", backup_id)
    assert [r["verified"] for r in records] == [True, False]
    with open_repository(str(config)) as repo:
        assert set_verified(repo, "web01", backup_id) is False

    from flows.verify import scrub

    state = scrub(config=str(config), return_state=True)
    assert state.is_failed() and "problem" in state.message


def test_tier_recovery_order_and_host_concurrency(prefect_server, qemu, tmp_path: Path, monkeypatch) -> None:
    import hotvm.verify as verify_mod
    from flows.recover import recover
    from hotvm.formats.manifest import Manifest

    config, backup = _backup_bare(qemu, tmp_path, "seed", max_concurrent_backups=2)
    target = tmp_path / "target"
    src = target / "vms" / "seed" / backup["backup_id"]
    # five VMs on one host: the same backup set copied under each name (a real set each)
    tiers = {"zeta": (1, 1), "alpha": (1, 2), "mid": (1, None), "beta": (1, None), "other": (2, None)}
    for name in tiers:
        dst = target / "vms" / name / backup["backup_id"]
        shutil.copytree(src, dst)
        manifest = Manifest.model_validate_json((dst / "manifest.json").read_text())
        renamed = manifest.model_copy(update={"vm": name}).with_checksum()  # a real set of that VM
        (dst / "manifest.json").write_text(renamed.model_dump_json())
    shutil.rmtree(target / "vms" / "seed")

    cfg = yaml.safe_load(config.read_text())
    qmp = cfg["hosts"][0]["vms"][0]["qmp"]
    entries = []
    for name, (tier, order) in tiers.items():
        entry = {"name": name, "qmp": qmp, "tier": tier}
        if order is not None:
            entry["startup_order"] = order
        entries.append(entry)
    cfg["hosts"][0]["vms"] = entries
    config.write_text(yaml.safe_dump(cfg))
    expected = ["zeta", "alpha", "beta", "mid"]

    active, peak, lock = [0], [0], threading.Lock()
    two_at_once = threading.Event()
    real = verify_mod.restore_into

    def slow_restore(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 2:
                two_at_once.set()
        try:
            # the first restore waits for a second one to start (a sleep would let a loaded machine decide
            # whether they overlap); then the host limit alone decides that no third one joins them
            two_at_once.wait(120)
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(verify_mod, "restore_into", slow_restore)
    rows = recover(tier=1, to=str(tmp_path / "dr"), config=str(config))
    assert [r["vm"] for r in rows] == expected
    assert all(r["ok"] and r["verified"] and r["seconds"] > 0 for r in rows)
    starts = [r["started_at"] for r in rows]
    assert starts == sorted(starts)  # started in recovery order
    assert peak[0] == 2  # host max_concurrent_backups=2, and it is used
    by_vm = {r["vm"]: r for r in rows}
    # the third VM could only start once one of the first two had finished
    assert by_vm[expected[2]]["started_at"] >= min(by_vm[v]["finished_at"] for v in expected[:2])
    for name in expected:
        assert (tmp_path / "dr" / name / "data.qcow2").exists()
    assert not (tmp_path / "dr" / "other").exists()


def test_recover_goes_on_when_a_discovering_host_is_down(prefect_server, qemu, tmp_path: Path) -> None:
    """The disaster case: a libvirt host (every VM discovered) cannot be reached. The QEMU host's VM is
    still restored byte for byte, the down host is named once with its URI and the fix, and the run exits
    non-zero."""
    from servers import free_port

    config, _ = _backup_bare(qemu, tmp_path, "web01")
    uri = f"qemu+tcp://127.0.0.1:{free_port()}/system"  # nothing listens there
    cfg = yaml.safe_load(config.read_text())
    cfg["hosts"][0]["vms"][0]["tier"] = 1
    cfg["hosts"].append({"name": "down-kvm", "driver": "libvirt", "uri": uri})
    config.write_text(yaml.safe_dump(cfg))

    proc = hotvm("recover", "--tier", "1", "--to", str(tmp_path / "dr"), "--format", "raw",
                 "--config", str(config), "--json", check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    rows = {r["vm"]: r for r in json.loads(proc.stdout)}
    assert rows["web01"]["ok"], rows
    (down,) = [r for r in rows.values() if r["host"] == "down-kvm"]
    assert not down["ok"] and uri in down["problems"][0] and "hotvm.yaml" in down["problems"][0]
    (image,) = (tmp_path / "dr" / "web01").glob("data*")
    with image.open("rb") as f:
        assert f.read(2 * MiB) == b"\x5a" * (2 * MiB)
    assert "down-kvm" in proc.stderr  # the one-line error names the host too
