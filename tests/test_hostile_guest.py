"""A hostile guest, a tampered set: nothing from a guest, a manifest or a tar archive leaves the destination.

The guest file system is a real ext4 (mkfs.ext4 -d) holding a symlink to a directory of this host and a
directory entry whose name holds '/' (its name bytes patched on the image, as a guest's root can), plus a
name that is not UTF-8. It is backed up from a running QEMU VM through the real CLI, then restored with
`files restore` and `restore --hybrid`. The sets on the (unencrypted, file) target are then tampered with
as an attacker holding the target could: an entry list carrying the forged entry, a config archive with a
'files/../..' member, a manifest whose backup_id walks out of its directory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
import zstandard
from helpers import hotvm, hotvm_json
from qemu_helpers import DiskSpec

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mounts, ownership)"),
    pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs e2fsprogs"),
    pytest.mark.timeout(600),
]

SECRET = b"host secret, not for guests\n"
REPORT = b"quarterly report\n" * 40
EVIL = b"written by the guest\n"
CAFE = b"a name that is not UTF-8\n"
CAFE_NAME = b"caf\xe9.txt"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOTVM_CATALOG_DIR", str(tmp_path / "catalog"))
    monkeypatch.setenv("HOTVM_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path


def host_dir(root: Path) -> Path:
    """A directory of the backup host the guest aims at, with a 0600 file it wants to overwrite."""
    outside = root / "host-dir"
    outside.mkdir()
    (outside / "pwned").write_bytes(SECRET)
    os.chmod(outside / "pwned", 0o600)
    return outside


def assert_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["pwned"]
    st = os.lstat(outside / "pwned")
    assert (outside / "pwned").read_bytes() == SECRET and stat.S_IMODE(st.st_mode) == 0o600


def hostile_ext4(path: Path, outside: Path) -> Path:
    """ext4 on the whole disk: /docs/report.txt, /escape -> `outside`, a dirent named 'escape/pwned',
    and caf\\xe9.txt. No metadata_csum: the patched directory block stays valid for the kernel too."""
    stage = path.parent / "stage"
    (stage / "docs").mkdir(parents=True)
    (stage / "docs" / "report.txt").write_bytes(REPORT)
    os.symlink(str(outside), stage / "escape")
    (stage / "escapeXpwned").write_bytes(EVIL)
    with open(os.path.join(os.fsencode(stage), CAFE_NAME), "wb") as f:
        f.write(CAFE)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", "-d", str(stage), str(path), "16M"],
        check=True, capture_output=True,
    )  # fmt: skip
    image = bytearray(path.read_bytes())
    assert image.count(b"escapeXpwned") == 1
    at = image.find(b"escapeXpwned")
    image[at + len("escape")] = ord("/")  # what a guest's root does with a disk editor
    path.write_bytes(image)
    return path


def forge_entry(target: Path, vm: str, volume: str) -> None:
    """Put the forged 'escape/pwned' entry into the newest file set's entry list, as a hotvm before the
    name check stored it (the set is unencrypted: anyone holding the target can do this)."""
    from hotvm.config import TargetConfig
    from hotvm.files.filesets import FileSets, decode_entries, encode_entries
    from hotvm.formats.repository import Repository
    from targets import open_target

    repo = Repository(open_target(TargetConfig(name="nas", url=f"file://{target}")))
    fsets = FileSets(repo)
    manifest = fsets.latest(vm)
    record = manifest.volume(volume)
    path = f"{fsets.set_dir(vm, manifest.backup_id)}/volumes/{record.entries}"
    entries = decode_entries(repo.read_file(path))
    report = next(e for e in entries if e["path"] == "/docs/report.txt")
    forged = {**report, "path": "/escape/pwned", "inode": 99, "mode": 0o644}
    repo.write_file(path, encode_entries([*entries, forged]))


def test_hostile_guest_names_never_leave_the_destination(prefect_server, qemu, env: Path) -> None:
    outside = host_dir(env)
    disk = hostile_ext4(env / "vda.raw", outside)
    vm = qemu([DiskSpec("vda", disk, format="raw")])
    config = env / "hotvm.yaml"
    config.write_text(yaml.safe_dump({
        "hosts": [{"name": f"h-{env.name}", "vms": [{"name": "evil", "qmp": str(vm.qmp_path)}]}],
        "targets": [{"name": "nas", "url": f"file://{env}/target"}],
    }))  # fmt: skip
    c = ("-c", str(config))
    hotvm("backup", "evil", *c)  # the weekly image, for the hybrid restore below

    # the backup refuses the forged name and says so; everything else is backed up
    result = hotvm_json("files", "backup", "evil", *c)
    (vol,) = result["volumes"]
    key = vol["volume"]
    assert vol["status"] == "ok" and vol["files_unreadable"] == 1
    assert vol["unreadable"] == ["/escape/pwned: the name holds '/' or NUL; not backed up"]

    # a name that is not UTF-8: listed and found (shown as \xe9), restored with its exact bytes
    names = {r["path"] for r in hotvm_json("files", "ls", "evil", f"/{key}", *c)}
    assert f"/{key}/caf\\xe9.txt" in names and f"/{key}/escape" in names
    found = hotvm_json("files", "find", "evil", "caf*", *c)
    assert [r["path"] for r in found] == [f"/{key}/caf\\xe9.txt"]
    catalog = env / "catalog"  # every file name of every guest: private to the backup host
    assert stat.S_IMODE(catalog.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in catalog.iterdir()} == {0o600}
    one = env / "one"
    hotvm("files", "restore", "evil", f"/{key}/caf\\xe9.txt", "--to", str(one), *c)  # the form ls prints
    assert os.listdir(os.fsencode(one / key)) == [CAFE_NAME]
    assert Path(os.fsdecode(os.fsencode(one / key) + b"/" + CAFE_NAME)).read_bytes() == CAFE

    # the set carries the forged entry (an older hotvm stored it, or the target was edited): skipped, named
    forge_entry(env / "target", "evil", key)
    out = env / "out"
    proc = hotvm("files", "restore", "evil", f"/{key}", "--to", str(out), *c)
    assert f"/{key}/escape/pwned: its parent /{key}/escape is a symlink in the backup" in proc.stderr
    assert os.readlink(out / key / "escape") == str(outside)  # the guest's symlink, restored as data
    assert (out / key / "docs" / "report.txt").read_bytes() == REPORT
    assert_untouched(outside)
    proc = hotvm("files", "restore", "evil", f"/{key}", "--to", str(out), "--overwrite", *c)
    assert "escape/pwned" in proc.stderr
    assert_untouched(outside)

    # the destination itself holds a symlink where a parent should be: never written through
    planted = env / "planted"
    (planted / key).mkdir(parents=True)
    os.symlink(str(outside), planted / key / "escape")
    proc = hotvm("files", "restore", "evil", f"/{key}/escape/pwned", "--to", str(planted), *c, check=False)
    assert proc.returncode != 0 and "already exist or are in the way" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = hotvm(
        "files", "restore", "evil", f"/{key}/escape/pwned", "--to", str(planted), "--overwrite", *c
    )  # fmt: skip
    assert "is a symlink or not a directory; not written through it" in proc.stderr
    assert_untouched(outside)

    # hybrid: the image restored as raw, the file set applied on a loop mount of it
    if not Path("/sys/module/loop").exists() and shutil.which("losetup") is None:
        pytest.skip("needs loop devices for the hybrid restore")
    proc = hotvm("restore", "evil", "--hybrid", "--to", str(env / "dr"), "--json", *c)
    hybrid = json.loads(proc.stdout)
    (row,) = hybrid["volumes"]
    assert any("escape/pwned" in s for s in row["skipped"]), row
    assert_untouched(outside)


# --------------------------------------------------------------------------- tampered sets


def _tar_zst(members: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def _rewrite_set(set_dir: Path, archive: bytes | None = None, **fields: object) -> None:
    """Change a set on the file target: a new config archive (its checksum in the manifest updated) and
    manifest fields."""
    from hotvm.formats.export import chunk_digest

    manifest = json.loads((set_dir / "manifest.json").read_text())
    if archive is not None:
        name = manifest["config_archive"]["name"]
        (set_dir / name).write_bytes(archive)
        manifest["config_archive"]["sha256"] = chunk_digest(archive)
        manifest["config_archive"]["size"] = len(archive)
    manifest.update(fields)
    try:  # an attacker who rewrites the manifest's checksum too (only encryption stops that)
        from hotvm.formats.manifest import Manifest

        manifest["checksum"] = Manifest.model_validate(manifest).computed_checksum()
    except ValueError:
        pass  # a field the model refuses: the manifest is refused whatever its checksum
    (set_dir / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_config_archive_and_backup_id_write_nothing_outside(prefect_server, qemu, env: Path) -> None:
    from qemu_helpers import qemu_img

    outside = host_dir(env)
    victim = env / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_bytes(b"keep me")
    qemu_img("create", "-f", "qcow2", str(env / "vda.qcow2"), "4M")
    vm = qemu([DiskSpec("vda", env / "vda.qcow2")])
    standby = env / "standby"
    config = env / "hotvm.yaml"
    config.write_text(yaml.safe_dump({
        "hosts": [
            {"name": f"src-{env.name}",
             "vms": [{"name": "web", "qmp": str(vm.qmp_path), "standby_host": "sby"}]},
            {"name": "sby", "vm_dir": str(standby)},
        ],
        "targets": [{"name": "nas", "url": f"file://{env}/target"}],
    }))  # fmt: skip
    c = ("-c", str(config))
    backup = hotvm_json("backup", "web", *c)
    set_dir = env / "target" / "vms" / "web" / backup["backup_id"]
    original = {p.name: p.read_bytes() for p in set_dir.iterdir() if p.is_file()}

    # a config archive with a member that climbs out of the standby's vm_dir (and out of a restore's dir)
    climb = "../" * 20 + str(outside).lstrip("/") + "/written"
    launch = b"#!/bin/sh\nexec qemu-system-x86_64 -name web -qmp unix:/run/web.qmp,server=on,wait=off\n"
    _rewrite_set(set_dir, _tar_zst({
        "vm-description.json": b"{}", "files/etc/web/launch.sh": launch, f"files/{climb}": b"pwned",
    }))  # fmt: skip
    proc = hotvm("sync-config", "web", *c, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "config archive" in proc.stderr or "manifest" in proc.stderr, proc.stderr
    proc = hotvm("restore", "web", "--to", str(env / "r1"), *c, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert_untouched(outside)

    # a manifest whose backup_id walks out of its directory: no host path is ever made from it
    for name, data in original.items():
        (set_dir / name).write_bytes(data)
    _rewrite_set(set_dir, backup_id="x/../../../victim")  # standby/web/disks-x/../../../victim = victim
    proc = hotvm("sync-config", "web", "--with-disks", *c, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "backup id" in proc.stderr or "backup_id" in proc.stderr or "manifest" in proc.stderr, proc.stderr
    proc = hotvm("restore", "web", "--to-host", "sby", *c, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(os.listdir(victim)) == ["keep.txt"] and (victim / "keep.txt").read_bytes() == b"keep me"
    assert not (env / "victim.partial").exists()
    assert_untouched(outside)
