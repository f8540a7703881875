"""vcsim (govmomi's vCenter simulator, built here from Debian's sources) on loopback, for the vSphere tests.

`vcsim_binary` builds it once per session with scripts/build-vcsim.sh (cached; skips only when `go` is
missing); `start_vcsim` runs one simulated vCenter (VPX model: datacenter DC0, hosts DC0_H0/DC0_H1 and a
cluster, VMs DC0_H0_VM0 ..., datastore LocalDS_0) on a free 127.0.0.1 port.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
USER = "administrator@vsphere.local"
PASSWORD_ENV = "HOTVM_VC_PASSWORD"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Vcsim:
    proc: subprocess.Popen
    url: str
    password: str

    @property
    def base(self) -> str:
        return self.url.removesuffix("/sdk")

    def _open(self, path: str, method: str = "GET") -> bytes:
        import ssl

        ctx = ssl._create_unverified_context()  # the simulator's own self-signed certificate
        req = urllib.request.Request(self.base + path, method=method)
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.read()

    def ask(self, vm: str, text: str, choices: list[str], qid: str = "q1") -> None:
        """Put a question on a simulated VM (test endpoint of scripts/vcsim/main.go)."""
        query = urllib.parse.urlencode({"vm": vm, "id": qid, "text": text, "choices": ",".join(choices)})
        self._open(f"/hotvm-test/question?{query}", "POST")

    def answers(self) -> list[dict]:
        return json.loads(self._open("/hotvm-test/answers"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def build_vcsim() -> Path:
    if shutil.which("go") is None:
        pytest.skip("vcsim cannot be built: 'go' is missing (apt-get install golang-go "
                    "golang-github-vmware-govmomi-dev)")  # fmt: skip
    out = subprocess.run(
        [str(REPO / "scripts" / "build-vcsim.sh")], capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"building vcsim failed:\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


def self_signed_cert(where: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with openssl: the CA bundle a user would give verify_tls."""
    cert, key = where / "vcsim.pem", where / "vcsim.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return cert, key


def start_vcsim(binary: Path, password: str, hosts: int = 2, tls: tuple[Path, Path] | None = None) -> Vcsim:
    port = _free_port()
    extra = ["-tlscert", str(tls[0]), "-tlskey", str(tls[1])] if tls else []
    proc = subprocess.Popen(
        [str(binary), "-l", f"127.0.0.1:{port}", "-username", USER, "-password", password,
         "-host", str(hosts), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("VCSIM_URL="):
                return Vcsim(proc, line.split("=", 1)[1].strip(), password)
            if not line:
                break
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"vcsim did not start (exit {proc.poll()})")


def running_vcsim(binary: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vcsim]:
    """Body of the `vcsim` fixture: a fresh simulated vCenter (0.1 s to start) whose password is in
    $HOTVM_VC_PASSWORD; always stopped."""
    password = "s3cret-" + os.urandom(4).hex()
    monkeypatch.setenv(PASSWORD_ENV, password)
    sim = start_vcsim(binary, password)
    try:
        yield sim
    finally:
        sim.stop()


def vsphere_config(
    path: Path,
    sim: Vcsim,
    vms: list[str],
    target_url: str,
    host_name: str = "vc",
    retries: int = 2,
    **extra: object,
) -> Path:
    """A hotvm.yaml with one vsphere host (the simulator) and one file target."""
    lines = ["hosts:", f"  - name: {host_name}", "    driver: vsphere", f"    url: {sim.url}",
             f"    username: {USER}", f"    password_env: {PASSWORD_ENV}",
             "    verify_tls: false"]  # fmt: skip
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    lines.append("    vms:")
    lines += [f"      - name: {vm}" for vm in vms]
    lines += ["targets:", "  - name: nas", f"    url: {target_url}"]
    lines += ["retries:", f"  retries: {retries}", "  retry_delay_s: 1"]
    path.write_text("\n".join(lines) + "\n")
    return path
