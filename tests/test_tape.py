"""Tape copies against a real file-backed virtual tape library and real backup sets (real format, random
incompressible disk contents so the media really fill up and copies span them)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest

from hotvm.config import TargetConfig
from hotvm.credentials import encryption_key
from hotvm.formats.configtar import ARCHIVE_NAME, build_config_archive
from hotvm.formats.export import chunk_digest, export_image
from hotvm.formats.manifest import ConfigArchive, Manifest
from hotvm.formats.repository import Repository, new_backup_id
from hotvm.tape.copy import (
    MediumState,
    TapeFile,
    TapeFull,
    catalogs_from_scan,
    copy_to_tape,
    plan_media,
    restore_from_tape,
    reusable,
    scan_library,
    store_catalog,
    stored_catalogs,
)
from hotvm.tape.drive import BLOCK, SequentialAccessError, VirtualLibrary
from targets import open_target

MiB = 1 << 20
T0 = dt.datetime(2030, 1, 6, 8, 0, tzinfo=dt.UTC)  # a Sunday, 08:00: the weekly-tape slot
KEY_ENV = "HOTVM_TEST_TAPE_KEY"


def backup(repo: Repository, vm: str, image: Path, when: dt.datetime) -> Manifest:
    backup_id = new_backup_id(when)
    repo.mark_started(vm, backup_id, "h1")
    record = export_image(repo, device="data", image=str(image), fmt="raw", chunk_size=MiB, frozen_at=when)
    repo.write_disk_record(vm, backup_id, record)
    data, names = build_config_archive([], {"vm": vm})
    repo.write_blob(vm, backup_id, ARCHIVE_NAME, data)
    manifest = Manifest(
        backup_id=backup_id, vm=vm, host="h1", driver="qemu", disks=[record], started_at=when,
        completed_at=when + dt.timedelta(minutes=1),
        config_archive=ConfigArchive(
            name=ARCHIVE_NAME, sha256=chunk_digest(data), size=len(data), files=names
        ),
    )
    repo.commit_manifest(manifest)
    return manifest


def random_image(path: Path, size: int, regions: list[tuple[int, int]]) -> Path:
    with open(path, "r+b" if path.exists() else "w+b") as f:
        f.truncate(size)
        for offset, length in regions:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def make_repo(tmp_path: Path, **cfg: object) -> tuple[Repository, TargetConfig, dict[str, bytes]]:
    """web01: two sets (6 MiB, then 2 MiB changed), db01: one set of 4 MiB; returns the disk contents of
    each set as the set saw them. About 17 MiB of chunks on tape (each archive carries its own chunks)."""
    config = TargetConfig(name="nas", url=f"file://{tmp_path / 'target'}", **cfg)
    repo = Repository(open_target(config), encryption_key(config))
    repo.ensure()
    images = {}
    web = random_image(tmp_path / "web01.raw", 8 * MiB, [(0, 6 * MiB)])
    m = backup(repo, "web01", web, T0 - dt.timedelta(days=7))
    images[m.backup_id] = web.read_bytes()
    random_image(web, 8 * MiB, [(1 * MiB, 2 * MiB)])
    m = backup(repo, "web01", web, T0 - dt.timedelta(days=1))
    images[m.backup_id] = web.read_bytes()
    db = random_image(tmp_path / "db01.raw", 6 * MiB, [(2 * MiB, 4 * MiB)])
    m = backup(repo, "db01", db, T0 - dt.timedelta(days=2))
    images[m.backup_id] = db.read_bytes()
    return repo, config, images


def vtl(tmp_path: Path, media: int, capacity: str = "8MiB", name: str = "vtl") -> VirtualLibrary:
    return VirtualLibrary(name, f"vtl://{tmp_path / name}?media={media}&capacity={capacity}")


def test_copy_spans_media_and_restores_from_tape_alone(tmp_path: Path) -> None:
    repo, _, images = make_repo(tmp_path)
    library = vtl(tmp_path, media=3)
    catalog = copy_to_tape(repo, library, target_name="nas", now=T0)
    store_catalog(repo, catalog)
    assert catalog["media"] == ["HV0001", "HV0002", "HV0003"]
    assert len(catalog["sets"]) == 3 and any(len(s["parts"]) > 1 for s in catalog["sets"])
    for medium in catalog["media"]:
        assert (tmp_path / "vtl" / f"{medium}.vtape").stat().st_size <= 8 * MiB

    # The catalog rebuilt from the tapes alone equals the one kept in the repository.
    rebuilt = catalogs_from_scan(scan_library(library))
    assert rebuilt == stored_catalogs(repo, "vtl") == [json.loads(json.dumps(catalog))]

    # Remove the repository: a restore needs only the tapes (and the catalog read from them).
    subprocess.run(["rm", "-rf", str(tmp_path / "target")], check=True)
    for entry in catalog["sets"]:
        dest = tmp_path / "restored" / entry["backup_id"]
        result = restore_from_tape(library, rebuilt, entry["vm"], entry["backup_id"], dest, "raw")
        assert Path(result["disks"][0]["path"]).read_bytes() == images[entry["backup_id"]]
        assert (dest / "config" / "vm-description.json").exists()
    # No id: the newest backup of the VM.
    latest = restore_from_tape(library, rebuilt, "web01", None, tmp_path / "latest", "raw")
    assert latest["backup_id"] == max(s["backup_id"] for s in catalog["sets"] if s["vm"] == "web01")


def test_append_second_copy_then_full_library_then_reuse_after_expiry(tmp_path: Path) -> None:
    repo, _, images = make_repo(tmp_path)
    library = vtl(tmp_path, media=3)
    first = copy_to_tape(repo, library, target_name="nas", vms=["db01"], now=T0)
    second = copy_to_tape(repo, library, target_name="nas", vms=["db01"], now=T0 + dt.timedelta(days=7))
    assert first["media"] == ["HV0001"]
    assert second["media"][0] == "HV0001"  # appended after the first copy's last filemark
    assert second["sets"][0]["parts"][0]["file"] > first["sets"][0]["parts"][0]["file"]
    states = scan_library(library)
    assert [c["copy_id"] for c in catalogs_from_scan(states)] == [first["copy_id"], second["copy_id"]]
    db_id = second["sets"][0]["backup_id"]
    out = restore_from_tape(library, catalogs_from_scan(states), "db01", db_id, tmp_path / "r", "raw")
    assert Path(out["disks"][0]["path"]).read_bytes() == images[db_id]

    # Everything does not fit on what is left: refused before anything is written.
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "vtl").iterdir()}
    with pytest.raises(TapeFull, match="tape library 'vtl' is full") as exc:
        copy_to_tape(repo, library, target_name="nas", now=T0 + dt.timedelta(days=14))
    assert "expires 2030-03-14" in exc.value.message  # HV0001 holds the second copy too
    assert {p.name: p.stat().st_size for p in (tmp_path / "vtl").iterdir()} == sizes

    # Two months later both copies have expired: the media are relabelled and reused.
    later = T0 + dt.timedelta(days=68)
    third = copy_to_tape(repo, library, target_name="nas", now=later)
    assert len(third["media"]) == 3
    assert [c["copy_id"] for c in catalogs_from_scan(scan_library(library))] == [third["copy_id"]]


def test_vtl_is_sequential_only(tmp_path: Path) -> None:
    library = vtl(tmp_path, media=1, capacity="1MiB")
    drive = library.load("HV0001")
    for i in range(3):
        drive.write_block(bytes([i]) * BLOCK)
    drive.write_filemark()
    drive.write_block(b"x" * BLOCK)
    drive.rewind()
    with pytest.raises(SequentialAccessError):
        drive.write_block(b"y" * BLOCK)  # not at the end of the data
    drive.fsf(1)
    assert drive.read_block() == b"x" * BLOCK
    drive.rewind()
    assert drive.read_block() == bytes([0]) * BLOCK
    drive.eod()
    drive.write_filemark()  # at the end: fine
    n = 0
    from hotvm.tape.drive import EndOfMedium

    with pytest.raises(EndOfMedium):
        while True:
            drive.write_block(b"z" * BLOCK)
            n += 1
    drive.write_filemark()  # the early-warning zone still takes the closing filemark
    assert n == 15 - 4 - 6
    drive.close()


def test_a_drive_missing_a_tape_operation_is_refused_not_a_silent_no_op(tmp_path: Path) -> None:
    """A drive class that forgets an operation (here: filemarks) cannot even be created, so a copy can
    never "write" a filemark that is not on the tape; a complete one works as the virtual medium does."""
    from hotvm.tape.drive import Drive, Library, VirtualMedium

    class ForgetsFilemarks(Drive):  # a new drive type, written against the interface, missing one operation
        medium = "m"

        def rewind(self) -> None: ...
        def read_block(self) -> bytes | None: ...
        def write_block(self, data: bytes) -> None: ...
        def eod(self) -> None: ...
        def erase(self) -> None: ...
        def close(self) -> None: ...

    with pytest.raises(TypeError, match="write_filemark"):
        ForgetsFilemarks()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="load"):
        type("NoLoad", (Library,), {})()
    drive = VirtualMedium(tmp_path / "ok.vtape", 1 << 20)
    drive.write_filemark()
    drive.rewind()
    assert drive.read_block() is None  # the filemark is really there
    drive.close()


def _state(name: str, *copies: str) -> MediumState:
    files = [TapeFile(i, "label", {"copy_id": c}) for i, c in enumerate(copies)]
    return MediumState(name, files, remaining=10)


def _catalog(copy_id: str, created: dt.datetime, media: list[str], days: int = 60) -> dict:
    return {"copy_id": copy_id, "created": created.isoformat(), "media": media,
            "expires": (created + dt.timedelta(days=days)).isoformat()}


def test_expiry_and_reuse_rules() -> None:
    a = _catalog("a", T0 - dt.timedelta(days=70), ["M1", "M2"])
    b = _catalog("b", T0 - dt.timedelta(days=30), ["M2", "M3"])
    expiry = {"a": dt.datetime.fromisoformat(a["expires"]), "b": dt.datetime.fromisoformat(b["expires"])}
    m1, m2, m3, m4 = _state("M1", "a"), _state("M2", "a", "b"), _state("M3", "b"), _state("M4")
    m5 = _state("M5", "never-finished")  # a copy without catalog protects nothing
    assert reusable(m1, expiry, T0) and reusable(m4, expiry, T0) and reusable(m5, expiry, T0)
    assert not reusable(m2, expiry, T0)  # one expired copy does not free a medium another copy uses
    assert not reusable(m3, expiry, T0)
    assert not reusable(m1, expiry, T0 - dt.timedelta(days=11))  # exactly at expiry it is still kept
    plan = plan_media([m1, m2, m3, m4, m5], [a, b], T0, 100)
    assert [(p.medium, p.action) for p in plan] == [
        ("M3", "append"), ("M4", "blank"), ("M5", "relabel"), ("M1", "relabel"),
    ]
    # Sixty days after b: everything may be reused; nothing is appended to an expired copy.
    plan = plan_media([m1, m2, m3, m4], [a, b], T0 + dt.timedelta(days=31), 100)
    assert [(p.medium, p.action) for p in plan] == [
        ("M4", "blank"), ("M1", "relabel"), ("M2", "relabel"), ("M3", "relabel"),
    ]


def test_encrypted_repository_copied_as_stored_restored_with_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "correct horse battery staple")
    repo, config, images = make_repo(tmp_path, encryption_key_env=KEY_ENV)
    library = vtl(tmp_path, media=3)
    catalog = copy_to_tape(repo, library, target_name="nas", vms=["db01"], now=T0)
    assert catalog["repository"]["encryption"]["cipher"] == "aes-256-gcm"
    entry = catalog["sets"][0]
    tape_bytes = (tmp_path / "vtl" / "HV0001.vtape").read_bytes()
    plain_head = images[entry["backup_id"]][2 * MiB : 2 * MiB + 4096]
    assert plain_head not in tape_bytes and b'"vm":"db01"' not in tape_bytes  # still encrypted on tape
    with pytest.raises(Exception, match="encrypted"):
        restore_from_tape(library, [catalog], "db01", None, tmp_path / "nokey", "raw")
    out = restore_from_tape(library, [catalog], "db01", None, tmp_path / "r", "raw", key_config=config)
    assert Path(out["disks"][0]["path"]).read_bytes() == images[entry["backup_id"]]
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(Exception, match="wrong encryption key"):
        restore_from_tape(library, [catalog], "db01", None, tmp_path / "wrong", "raw", key_config=config)


def test_tape_flow_and_cli(prefect_server, tmp_path: Path) -> None:
    """tape copy, tape list and restore --from-tape through the real CLI and a real Prefect server."""
    from helpers import hotvm

    _, _, images = make_repo(tmp_path)
    config = tmp_path / "hotvm.yaml"
    config.write_text(
        f"hosts: [{{name: h1}}]\ntargets:\n  - name: nas\n    url: file://{tmp_path / 'target'}\n"
        f"tapes:\n  - name: vtl\n    url: \"vtl://{tmp_path / 'vtl'}?media=3&capacity=8MiB\"\n"
        "    keep: {days: 60}\n"
    )
    copy = json.loads(hotvm("tape", "copy", "--tape", "vtl", "db01", "--json", "-c", str(config)).stdout)
    assert [s["vm"] for s in copy["sets"]] == ["db01"] and copy["media"] == ["HV0001"]
    assert (tmp_path / "target" / copy["catalog_path"]).exists()
    media = json.loads(hotvm("tape", "list", "--tape", "vtl", "--json", "-c", str(config)).stdout)
    assert media[0]["copies"] == [copy["copy_id"]] and media[0]["expires"] == copy["expires"]
    assert [f["kind"] for f in media[0]["files"]] == ["label", "archive", "catalog"]
    assert media[1]["blank"] and media[1]["expires"] is None
    out = json.loads(hotvm("restore", "db01", "--from-tape", "vtl", "--to", str(tmp_path / "r"),
                           "--format", "raw", "--json", "-c", str(config)).stdout)
    assert Path(out["disks"][0]["path"]).read_bytes() == images[out["backup_id"]]
    bad = hotvm("tape", "list", "--tape", "nope", "-c", str(config), check=False)
    assert bad.returncode == 2 and "unknown tape 'nope'" in bad.stderr


def test_catalog_cut_at_the_end_of_a_medium_is_rejoined(tmp_path: Path) -> None:
    from hotvm.tape.copy import CATALOG_FORMAT, CopyWriter, MediumPlan
    from hotvm.tape.format import ARCHIVE, CATALOG, RECORD_PAYLOAD

    library = vtl(tmp_path, media=2, capacity="1MiB")  # 15 blocks, 11 before the early warning
    plan = [MediumPlan("HV0002", "blank", 9), MediumPlan("HV0001", "blank", 9)]
    writer = CopyWriter(library, plan, {"copy_id": "c1", "created": T0.isoformat()})
    out = writer.begin(ARCHIVE, "web01/x")
    out.write(os.urandom(8 * RECORD_PAYLOAD))
    writer.end(out)
    catalog = {"format": CATALOG_FORMAT, "copy_id": "c1", "created": T0.isoformat(), "sets": [],
               "padding": "x" * (3 * RECORD_PAYLOAD)}
    out = writer.begin(CATALOG, "catalog")
    out.write(json.dumps(catalog).encode())
    done = writer.end(out)
    writer.close()
    assert [p["medium"] for p in done["parts"]] == ["HV0002", "HV0001"]
    assert catalogs_from_scan(scan_library(library)) == [catalog]
