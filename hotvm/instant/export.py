"""Start and stop the read-only NBD export of a backup set: nbdkit with hotvm's Python plugin.

Why nbdkit: it is a maintained NBD server whose Python plugin lets hotvm serve reads straight from its
chunk store, verifying each chunk, without a copy; QEMU's own servers (qemu-nbd, qemu-storage-daemon) only
export what a QEMU block driver can read, and none reads hotvm's content-addressed, compressed (and
possibly encrypted) chunks. docs/instant.md has the measurements.

The export listens on a unix socket in a private 0700 directory, is read-only (`-r`), and exits by itself
once its last client disconnects (the `exitlast` filter): when the stream has finished, QEMU drops the
repository nodes and nbdkit goes away. Secrets reach it through an inherited pipe, never argv or env.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import hotvm
from hotvm.config import TargetConfig
from hotvm.errors import HotvmError
from hotvm.formats.manifest import Manifest
from hotvm.formats.repository import Repository, read_marker
from hotvm.guest.qemu import pid_alive, read_pid

PLUGIN = Path(__file__).with_name("nbd_plugin.py")
START_TIMEOUT_S = 30.0
HANDED_PASSWORD = "HOTVM_HANDED_PASSWORD"


class ExportError(HotvmError):
    """The NBD export of a backup set could not be started."""


def nbdkit_binary() -> str:
    path = shutil.which("nbdkit")
    if path is None:
        raise ExportError(
            "instant restore needs nbdkit with its Python plugin, which is not installed",
            "apt-get install nbdkit nbdkit-plugin-python (scripts/install-system-deps.sh)",
        )
    return path


def _credentials(config: TargetConfig) -> tuple[dict, dict[str, str]]:
    """The target configuration the plugin opens and the credential values it needs, by variable name.

    A Prefect Secret block is resolved here (the plugin must not call the Prefect API) and handed in under
    a private name; the encryption key is not handed in at all: the plugin gets derived keys."""
    from hotvm import credentials

    plain = config.model_dump(mode="json")
    plain.update(encryption_key_env=None, encryption_key_secret=None)
    values: dict[str, str] = {}
    for field in ("access_key_env", "secret_key_env", "password_env"):
        var = getattr(config, field)
        if var:
            owner = credentials.target(config)
            values[var] = credentials.from_env(owner, var, field.removesuffix("_env")).value or ""
    if config.password_secret:
        values[HANDED_PASSWORD] = credentials.password(config).value or ""
        plain.update(password_env=HANDED_PASSWORD, password_secret=None)
    return plain, values


def _keys(repo: Repository) -> dict | None:
    """The encrypted repository's data and chunk-id keys (hex), derived from the configured secret."""
    if not repo.encrypted:  # also checks the key: a wrong one fails here, with the usual message
        return None
    from hotvm.formats.crypto import open_encryption

    meta = read_marker(repo.target) or {}
    keys = open_encryption(repo.key.value or "", meta["encryption"])
    assert keys is not None  # repo.encrypted accepted the same secret
    return {"data": keys.data.hex(), "ids": keys.ids.hex()}


def bundle(repo: Repository, manifest: Manifest, cache_dir: Path | None, cache_bytes: int,
           unreachable_wait_s: float) -> dict:  # fmt: skip
    if repo.target.config is None:
        raise ExportError(f"target '{repo.target.name}' has no configuration", "open it with open_target")
    target, handed = _credentials(repo.target.config)
    return {
        "python": list(sys.version_info[:2]),
        "target": target,
        "credentials": handed,
        "keys": _keys(repo),
        "chunk_hash": repo.chunk_hash,
        "disks": [{"export": d.device, "record": d.model_dump(mode="json")} for d in manifest.disks],
        "cache_dir": str(cache_dir) if cache_dir else None,
        "cache_bytes": cache_bytes,
        "unreachable_wait_s": unreachable_wait_s,
    }


def _import_paths() -> str:
    root = Path(hotvm.__file__).resolve().parent.parent
    paths = [str(root), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return ":".join(dict.fromkeys(paths))


def start_export(run_dir: Path, payload: dict, filters: tuple[str, ...] = ()) -> int:
    """Start nbdkit daemonized on run_dir/nbd.sock; returns its pid once the socket accepts clients.
    `filters`: more nbdkit filters (bench/instant.py measures `noextents`)."""
    sock, pidfile, log = run_dir / "nbd.sock", run_dir / "nbdkit.pid", run_dir / "nbdkit.log"
    sock.unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)
    (run_dir / "problems.jsonl").unlink(missing_ok=True)  # this export's problems only (core.wait_ready)
    read_fd, write_fd = os.pipe()
    cmd = [
        nbdkit_binary(), "--unix", str(sock), "--pidfile", str(pidfile), "--readonly", "--log=stderr",
        "--filter=exitlast", *(f"--filter={f}" for f in filters), "python", str(PLUGIN),
        f"path={_import_paths()}", f"bundle_fd={read_fd}", f"log_dir={run_dir}",
    ]  # fmt: skip
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=(read_fd,),
            start_new_session=True, env=_plain_env(),
        )  # fmt: skip
    os.close(read_fd)
    try:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(json.dumps(payload).encode())
    except BrokenPipeError:
        pass  # it died before reading: reported below with its log
    try:
        code = proc.wait(START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -1
    deadline = time.monotonic() + 2  # the pid file and socket may lag the foreground's exit a little
    while code == 0 and not (sock.exists() and pid_alive(read_pid(pidfile), str(sock))):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    pid = read_pid(pidfile)
    if code != 0 or not sock.exists() or not pid_alive(pid, str(sock)):
        said = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise ExportError(
            f"nbdkit did not start the export of the backup set (exit {code}): {' | '.join(said)[-400:]}",
            f"see {log}; check that nbdkit-plugin-python runs the same Python version as hotvm",
        )
    return pid  # type: ignore[return-value]


def _plain_env() -> dict[str, str]:
    """Only what a process needs to run: no credential of any kind is inherited by the plugin."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def export_pid(run_dir: Path) -> int | None:
    pid = read_pid(run_dir / "nbdkit.pid")
    return pid if pid_alive(pid, str(run_dir / "nbd.sock")) else None


def stop_export(run_dir: Path, timeout: float = 10.0) -> None:
    pid = export_pid(run_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid, str(run_dir / "nbd.sock")) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid, str(run_dir / "nbd.sock")):
            os.kill(pid, signal.SIGKILL)
    (run_dir / "nbd.sock").unlink(missing_ok=True)
