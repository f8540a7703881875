"""Inventory of real (bare TCG) QEMU VMs with known hardware: collected, rendered and parsed back,
versioned on a target, diffed; the CLI and the inventory flow end to end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from helpers import hotvm
from qemu_helpers import DiskSpec, qemu_img, start_qemu

from hotvm import inventory
from hotvm.config_file import load_config

MAC = "52:54:00:12:34:56"
MAC2 = "52:54:00:ab:cd:ef"
MiB = 2**20


def _hardware(cpus: int, mem_mb: int, *nics: tuple[str, str]) -> list[str]:
    args = ["-smp", str(cpus), "-m", str(mem_mb)]
    for i, (model, mac) in enumerate(nics):
        # restrict=on: the user-mode backend never reaches beyond the VM (no traffic leaves it)
        args += ["-netdev", f"user,id=n{i},restrict=on"]
        args += ["-device", f"{model},netdev=n{i},mac={mac},id=nic{i}"]
    return args


def _config(tmp_path: Path, vms: dict[str, dict], policies: list[str] | None = None) -> Path:
    lines = ["hosts:", "  - name: hv1", "    vms:"]
    for name, extra in vms.items():
        lines.append(f"      - name: {name}")
        lines += [f"        {k}: {json.dumps(v)}" for k, v in extra.items()]
    lines += ["targets:", "  - name: nas", f"    url: file://{tmp_path}/target"]
    if policies is not None:
        lines += ["policies:", "  - name: prod", f"    vms: {json.dumps(policies)}"]
    path = tmp_path / "hotvm.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fleet(tmp_path: Path):
    """db01: 2 CPUs, 128 MiB, qcow2 on virtio + raw on SCSI + qcow2 with a backing file on IDE, a
    virtio-net NIC with a known MAC and an empty CD-ROM; web01: 1 CPU, 64 MiB, one raw disk, an e1000."""
    started = []
    d = tmp_path / "db01"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(d / "sys.qcow2"), "48M")
    qemu_img("create", "-q", "-f", "raw", str(d / "data.raw"), "16M")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "32M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2", str(d / "top.qcow2"))
    db = start_qemu(
        d,
        [
            DiskSpec("sys", d / "sys.qcow2"),
            DiskSpec("data", d / "data.raw", format="raw", bus="scsi"),
            DiskSpec("logs", d / "top.qcow2", bus="ide", style="drive"),
            DiskSpec("cd0", None, bus="cdrom", style="drive"),
        ],
        extra_args=_hardware(2, 128, ("virtio-net-pci", MAC)),
    )
    started.append(db)
    db.qemu_io("sys", "write -P 0x11 0 4M")
    w = tmp_path / "web01"
    w.mkdir()
    qemu_img("create", "-q", "-f", "raw", str(w / "root.raw"), "8M")
    web = start_qemu(
        w, [DiskSpec("root", w / "root.raw", format="raw")], extra_args=_hardware(1, 64, ("e1000", MAC2))
    )
    started.append(web)
    launch = tmp_path / "db01.sh"
    launch.write_text("qemu-system-x86_64 ...\n")
    vms = {
        "db01": {"qmp": str(db.qmp_path), "config_files": [str(launch)], "startup_order": 1,
                 "external_data": ["NFS nas:/exports/db-dumps"]},
        "web01": {"qmp": str(web.qmp_path), "startup_order": 2},
        "old01": {"qmp": str(tmp_path / "gone.qmp")},
    }  # fmt: skip
    yield tmp_path, vms, {"db01": db, "web01": web}
    for vm in started:
        vm.stop()


def test_inventory_of_real_vms(fleet) -> None:
    tmp_path, vms, _ = fleet
    cfg = load_config(_config(tmp_path, vms))
    inv = inventory.collect(cfg)
    assert [v.name for v in inv.vms] == ["db01", "web01", "old01"]

    db = inv.vm("db01")
    assert db.error is None and db.host == "hv1" and db.driver == "qemu"
    assert (db.cpus, db.memory_bytes) == (2, 128 * MiB)
    assert db.status == "running" and db.qemu_version and db.qemu_version[0].isdigit()
    assert db.startup_order == 1 and db.external_data == ["NFS nas:/exports/db-dumps"]
    assert db.config_files == [str(tmp_path / "db01.sh")] and db.policy == "default"
    assert db.os is None
    disks = {d.device: d for d in db.disks}
    assert set(disks) == {"sys", "data", "logs"}
    assert (disks["sys"].bus, disks["sys"].format, disks["sys"].virtual_size) == ("virtio", "qcow2", 48 * MiB)
    assert (disks["data"].bus, disks["data"].format, disks["data"].virtual_size) == ("scsi", "raw", 16 * MiB)
    assert (disks["logs"].bus, disks["logs"].format) == ("ide", "qcow2")
    assert disks["logs"].backing_chain == [str(tmp_path / "db01" / "base.qcow2")]
    assert disks["sys"].path == str(tmp_path / "db01" / "sys.qcow2") and disks["sys"].mode == "persistent"
    assert disks["sys"].allocated_bytes >= 4 * MiB  # the 4 MiB written, plus qcow2 metadata
    assert all(d.allocated_bytes is not None for d in db.disks)
    assert [(n.model, n.mac, n.id) for n in db.nics] == [("virtio-net-pci", MAC, "nic0")]
    assert [(c.device, c.path) for c in db.cdroms] == [("cd0", None)]

    web = inv.vm("web01")
    assert (web.cpus, web.memory_bytes, web.startup_order) == (1, 64 * MiB, 2)
    assert [(n.model, n.mac, n.netdev) for n in web.nics] == [("e1000", MAC2, "n0")]
    assert [(d.device, d.format, d.virtual_size) for d in web.disks] == [("root", "raw", 8 * MiB)]

    old = inv.vm("old01")  # unreachable: listed with why, not dropped
    assert old.error and "gone.qmp" in old.error and old.cpus is None and old.disks == []

    # every output format, parsed back
    rows = list(csv.DictReader(io.StringIO(inventory.render(inv, "csv").decode())))
    assert [r["vm"] for r in rows] == ["db01", "web01", "old01"]
    assert rows[0]["cpus"] == "2" and rows[0]["memory_mb"] == "128" and MAC in rows[0]["nics"]
    assert "data (scsi, raw, 16 MiB)" in rows[0]["disks"] and rows[2]["error"] == old.error

    md = inventory.render(inv, "md").decode().splitlines()
    header = next(line for line in md if line.startswith("| host | vm |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    db_line = next(line for line in md if line.startswith("| hv1 | db01 |"))
    cells = dict(zip(cols, [c.strip() for c in db_line.strip("|").split("|")], strict=True))
    assert cells["cpus"] == "2" and cells["memory_mb"] == "128" and cells["startup_order"] == "1"
    assert sum(1 for line in md if line.startswith("| hv1 | db01 | ")) == 1 + 3  # VM row + 3 disk rows

    back = inventory.Inventory.model_validate_json(inventory.render(inv, "json"))
    assert back == inv

    from openpyxl import load_workbook

    wb = load_workbook(io.BytesIO(inventory.render(inv, "xlsx")))
    assert wb.sheetnames == ["VMs", "Disks"]
    sheet = list(wb["VMs"].iter_rows(values_only=True))
    assert list(sheet[0]) == inventory.VM_COLUMNS
    xrow = dict(zip(sheet[0], sheet[1], strict=True))
    assert (xrow["vm"], xrow["cpus"], xrow["memory_mb"]) == ("db01", "2", "128") and MAC in xrow["nics"]
    disk_sheet = list(wb["Disks"].iter_rows(values_only=True))
    assert {r[2] for r in disk_sheet[1:]} == {"sys", "data", "logs", "root"}


def test_diff_changed_vm_and_new_vm_without_policy(fleet) -> None:
    tmp_path, vms, running = fleet
    cfg = load_config(_config(tmp_path, {"db01": vms["db01"]}, policies=["db*"]))
    before = inventory.collect(cfg)
    assert inventory.diff(before, before).empty

    # db01's hardware changes (a new disk is hot-plugged), and web01 appears with no policy covering it
    db = running["db01"]
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "db01" / "extra.raw"), "4M")
    db.qmp("blockdev-add", driver="raw", **{"node-name": "extra-fmt"},
           file={"driver": "file", "filename": str(tmp_path / "db01" / "extra.raw")})  # fmt: skip
    db.qmp("device_add", driver="scsi-hd", bus="scsi0.0", drive="extra-fmt", id="extra")
    cfg = load_config(_config(tmp_path, {"db01": vms["db01"], "web01": vms["web01"]}, policies=["db*"]))
    after = inventory.collect(cfg)
    d = inventory.diff(before, after)
    assert d.added == ["web01"] and d.removed == []
    assert [c.field for c in d.changed if c.vm == "db01"] == ["disks"]
    assert "extra scsi raw" in next(c.new for c in d.changed)
    assert d.warnings == ["new VM 'web01' on host 'hv1' is covered by no policy"]
    md = inventory.diff_markdown(d, "last week")
    assert "**warning:** new VM 'web01'" in md and "| db01 | disks |" in md

    back = inventory.diff(after, before)
    assert back.removed == ["web01"] and back.added == []


def test_cli_inventory_versioned_on_target(fleet) -> None:
    tmp_path, vms, _ = fleet
    config = _config(tmp_path, {"db01": vms["db01"], "old01": vms["old01"]})
    rows = json.loads(hotvm("inventory", "-c", str(config), "--format", "json").stdout)
    assert [v["name"] for v in rows["vms"]] == ["db01", "old01"] and rows["vms"][1]["error"]

    out = tmp_path / "inv.xlsx"
    hotvm("inventory", "-c", str(config), "--format", "xlsx", "--output", str(out))
    from openpyxl import load_workbook

    assert load_workbook(out)["VMs"]["B2"].value == "db01"

    first = hotvm("inventory", "-c", str(config), "--target", "nas", "--format", "csv")
    assert "db01" in first.stdout and "first inventory" in first.stderr
    config = _config(tmp_path, vms)
    second = hotvm("inventory", "-c", str(config), "--target", "nas", "--format", "md")
    assert "added: web01" in second.stderr
    stored = sorted((tmp_path / "target" / "inventory").glob("*.json"))
    assert len(stored) == 2
    assert [v["name"] for v in json.loads(stored[-1].read_text())["vms"]] == ["db01", "web01", "old01"]


def test_inventory_flow(prefect_server, fleet) -> None:
    from prefect.client.orchestration import get_client

    from flows.inventory import inventory as inventory_flow

    tmp_path, vms, _ = fleet
    config = _config(tmp_path, {"db01": vms["db01"]}, policies=["db*"])
    first = inventory_flow(config=str(config))
    assert first["previous"] is None and first["stored"].startswith("inventory/")
    config = _config(tmp_path, vms, policies=["db*"])
    second = inventory_flow(config=str(config))
    assert second["previous"] == first["stored"].split("/")[-1]
    assert second["diff"]["added"] == ["old01", "web01"]
    assert "new VM 'web01' on host 'hv1' is covered by no policy" in second["diff"]["warnings"]
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"inventory-nas", "inventory-diff-nas"} <= keys


def test_inventory_deployment_is_weekly() -> None:
    import yaml

    repo = Path(__file__).resolve().parent.parent
    deployments = {d["name"]: d for d in yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]}
    inv = deployments["inventory"]
    assert inv["entrypoint"] == "flows/inventory.py:inventory"
    assert [s["cron"] for s in inv["schedules"]] == ["0 6 * * 1"]
