"""SFTP clients compared with OpenSSH's `sftp` to the same loopback sshd (issue #15: how hotvm's sftp://
target should move its bytes).

    .venv/bin/python bench/sftp_clients.py [--size-mib 256] [--rounds 3] [--workers 4]
                                           [--clients sftp,hotvm,paramiko,paramiko-conns,paramiko-procs,...]

Every contender stores the same incompressible data as 4 MiB blobs (a temporary name, then a rename over
it, as a backup's chunks are written) with `--workers` at once, then reads every blob back whole;
`sftp` puts and gets the same bytes as one file in batch mode (the baseline of bench/target_throughput.py).
Connecting is not timed. Rounds alternate the order of the contenders; figures are medians. CPU is the
client's (this process, its threads and reaped children: ssh, worker processes) plus the server's (sshd
and its per-connection children), in seconds per GiB moved.

Contenders (each skipped when its library is not installed):
  hotvm            the sftp:// target as shipped (targets/sftp.py)
  paramiko         one SSH connection, one SFTP channel per worker thread (hotvm's design before issue #15)
  paramiko-conns   one SSH connection per worker thread
  paramiko-procs   one SSH connection per worker process (multiprocessing: no shared GIL)
  ssh2-python      libssh2 (C), one session per worker thread
  ssh-python       libssh (C), one session per worker thread
  asyncssh         one connection, the workers as concurrent tasks on its event loop
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]
from _common import client_cpu, process_cpu  # noqa: E402
from servers import SshServer, _descendants  # noqa: E402

BLOB = 4 << 20


class Bench:
    def __init__(self, server: SshServer, blobs: list[bytes], workers: int, image: Path) -> None:
        self.s, self.blobs, self.workers, self.image = server, blobs, workers, image

    def server_cpu(self) -> float:
        deadline = time.monotonic() + 5  # per-connection children fold into the parent once reaped
        while len(_descendants(self.s.proc.pid)) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return sum(process_cpu(p) for p in (self.s.proc.pid, *_descendants(self.s.proc.pid)))

    def measure(self, run: Callable[[], None]) -> tuple[float, float, float]:
        subprocess.run(["sync"], check=True)
        c0, s0, t0 = client_cpu(), self.server_cpu(), time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        return wall, client_cpu() - c0, self.server_cpu() - s0

    def dir(self) -> str:
        d = self.s.root_dir / f"c-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return str(d)

    def names(self, d: str) -> list[str]:
        return [f"{d}/{i:05d}" for i in range(len(self.blobs))]


def run_sftp(b: Bench) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    s = b.s
    remote = f"{b.dir()}/plain.raw"
    local = b.image.with_suffix(".get")

    def batch(command: str) -> None:
        subprocess.run(["sftp", "-q", "-b", "-", "-P", str(s.port), "-i", str(s.client_key),
                        "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "BatchMode=yes", "root@127.0.0.1"], input=command + "\n", text=True, check=True,
                       capture_output=True)

    put = b.measure(lambda: batch(f"put {b.image} {remote}"))
    get = b.measure(lambda: (batch(f"get {remote} {local}"), local.unlink()))
    return put, get


def _threads(b: Bench, sessions: list, put_one: Callable, get_one: Callable, close: Callable):
    d = b.dir()
    names = b.names(d)
    local = threading.local()
    free = list(sessions)
    lock = threading.Lock()

    def mine():
        if not hasattr(local, "s"):
            with lock:
                local.s = free.pop()
        return local.s

    with ThreadPoolExecutor(b.workers) as pool:
        put = b.measure(lambda: list(pool.map(lambda i: put_one(mine(), names[i], b.blobs[i]),
                                              range(len(names)))))
        get = b.measure(lambda: list(pool.map(lambda i: get_one(mine(), names[i], len(b.blobs[i])),
                                              range(len(names)))))
    for sess in sessions:
        close(sess)
    return put, get


# ---- hotvm's target
def run_hotvm(b: Bench):
    from hotvm.config import TargetConfig
    from targets import open_target

    sub = uuid.uuid4().hex[:8]
    target = open_target(TargetConfig(name="bench", url=f"sftp://root@127.0.0.1:{b.s.port}{b.s.root_dir}/h-{sub}",
                                      key_file=b.s.client_key, known_hosts=b.s.known_hosts))
    names = [f"chunks/{i:05d}" for i in range(len(b.blobs))]
    with ThreadPoolExecutor(b.workers) as pool:
        list(pool.map(target.exists, ["x"] * b.workers * 2))  # one connection per worker, untimed
        put = b.measure(lambda: list(pool.map(lambda i: target.write_bytes(names[i], b.blobs[i]),
                                              range(len(names)))))
        get = b.measure(lambda: list(pool.map(target.read_bytes, names)))
    target.close()
    return put, get


# ---- paramiko
def _paramiko_client(s: SshServer):
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(s.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=s.port, username="root", key_filename=str(s.client_key),
                   allow_agent=False, look_for_keys=False)
    return client


def _paramiko_put(sftp, name: str, data: bytes) -> None:
    with sftp.open(name + ".tmp", "wb") as fh:
        fh.set_pipelined(True)
        fh.write(data)
    sftp.posix_rename(name + ".tmp", name)


def _paramiko_get(sftp, name: str, size: int) -> None:
    with sftp.open(name, "rb") as fh:
        fh.MAX_REQUEST_SIZE = 64 * 1024
        data = b"".join(fh.readv([(o, min(65536, size - o)) for o in range(0, size, 65536)]))
    assert len(data) == size


def run_paramiko(b: Bench):
    client = _paramiko_client(b.s)
    sessions = [client.open_sftp() for _ in range(b.workers)]
    out = _threads(b, sessions, _paramiko_put, _paramiko_get, lambda x: x.close())
    client.close()
    return out


def run_paramiko_conns(b: Bench):
    clients = [_paramiko_client(b.s) for _ in range(b.workers)]
    out = _threads(b, [c.open_sftp() for c in clients], _paramiko_put, _paramiko_get, lambda x: x.close())
    for c in clients:
        c.close()
    return out


def _proc_worker(server: SshServer, names: list[str], blobs: list[bytes], get: bool, go, done) -> None:
    client = _paramiko_client(server)
    sftp = client.open_sftp()
    done.put(0)
    go.wait()
    for name, blob in zip(names, blobs, strict=True):
        if get:
            _paramiko_get(sftp, name, len(blob))
        else:
            _paramiko_put(sftp, name, blob)
    sftp.close()
    client.close()


def run_paramiko_procs(b: Bench):
    d = b.dir()
    names = b.names(d)
    ctx = multiprocessing.get_context("fork")
    results = []
    for get in (False, True):
        go, done = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_proc_worker, args=(b.s, names[i::b.workers], b.blobs[i::b.workers], get,
                                                         go, done)) for i in range(b.workers)]
        for p in procs:
            p.start()
        for _ in procs:
            done.get()  # connected: not timed

        def run(procs=procs, go=go) -> None:
            go.set()
            for p in procs:
                p.join()
        results.append(b.measure(run))
    return tuple(results)


# ---- libssh2 / libssh
def _known_key(s: SshServer) -> bytes:
    import base64

    return base64.b64decode(s.known_hosts.read_text().split()[2])


def run_ssh2(b: Bench):
    from ssh2.session import Session
    from ssh2.sftp import LIBSSH2_FXF_CREAT, LIBSSH2_FXF_READ, LIBSSH2_FXF_TRUNC, LIBSSH2_FXF_WRITE

    def connect():
        sock = socket.create_connection(("127.0.0.1", b.s.port))
        sess = Session()
        sess.handshake(sock)
        key, _kind = sess.hostkey()
        assert key == _known_key(b.s), "host key"
        sess.userauth_publickey_fromfile("root", str(b.s.client_key))
        return sess, sess.sftp_init(), sock

    def put(c, name: str, data: bytes) -> None:
        with c[1].open(name + ".tmp", LIBSSH2_FXF_WRITE | LIBSSH2_FXF_CREAT | LIBSSH2_FXF_TRUNC, 0o600) as fh:
            fh.write(data)
        c[1].rename(name + ".tmp", name)  # libssh2 uses posix-rename@openssh.com where offered

    def get(c, name: str, size: int) -> None:
        parts, got = [], 0
        with c[1].open(name, LIBSSH2_FXF_READ, 0) as fh:
            while got < size:
                n, data = fh.read(size - got)
                if n <= 0:
                    break
                parts.append(data)
                got += n
        assert len(b"".join(parts)) == size

    return _threads(b, [connect() for _ in range(b.workers)], put, get, lambda c: c[0].disconnect())


def run_libssh(b: Bench):
    from ssh.key import import_privkey_file
    from ssh.session import Session

    def connect():
        sess = Session()
        sess.options_set(__import__("ssh.options", fromlist=["HOST"]).HOST, "127.0.0.1")
        sess.options_set_port(b.s.port)
        sess.options_set(__import__("ssh.options", fromlist=["USER"]).USER, "root")
        sess.connect()
        sess.userauth_publickey(import_privkey_file(str(b.s.client_key)))
        sftp = sess.sftp_new()
        sftp.init()
        return sess, sftp

    def put(c, name: str, data: bytes) -> None:
        fh = c[1].open(name + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(data)
        for o in range(0, len(data), 32768):
            fh.write(bytes(view[o:o + 32768]))
        fh.close()
        c[1].rename(name + ".tmp", name)

    def get(c, name: str, size: int) -> None:
        fh = c[1].open(name, os.O_RDONLY, 0)
        parts, got = [], 0
        while got < size:
            n, data = fh.read(min(65536, size - got))
            if n <= 0:
                break
            parts.append(data)
            got += n
        fh.close()
        assert got == size

    return _threads(b, [connect() for _ in range(b.workers)], put, get, lambda c: c[0].disconnect())


# ---- asyncssh
def run_asyncssh(b: Bench):
    import asyncssh

    d = b.dir()
    names = b.names(d)

    async def main():
        conn = await asyncssh.connect("127.0.0.1", b.s.port, username="root",
                                      client_keys=[str(b.s.client_key)], known_hosts=str(b.s.known_hosts),
                                      agent_path=None)
        sftp = await conn.start_sftp_client()
        sem = asyncio.Semaphore(b.workers)

        async def put(name: str, data: bytes) -> None:
            async with sem:
                async with sftp.open(name + ".tmp", "wb") as fh:
                    await fh.write(data)
                await sftp.posix_rename(name + ".tmp", name)

        async def get(name: str, size: int) -> None:
            async with sem, sftp.open(name, "rb") as fh:
                assert len(await fh.read(size)) == size

        async def puts() -> None:
            await asyncio.gather(*(put(n, x) for n, x in zip(names, b.blobs, strict=True)))

        async def gets() -> None:
            await asyncio.gather(*(get(n, len(x)) for n, x in zip(names, b.blobs, strict=True)))

        loop = asyncio.get_running_loop()
        put_m = await loop.run_in_executor(None, b.measure, lambda: asyncio.run_coroutine_threadsafe(
            puts(), loop).result())
        get_m = await loop.run_in_executor(None, b.measure, lambda: asyncio.run_coroutine_threadsafe(
            gets(), loop).result())
        conn.close()
        await conn.wait_closed()
        return put_m, get_m

    return asyncio.run(main())


CLIENTS = {"sftp": run_sftp, "hotvm": run_hotvm, "paramiko": run_paramiko,
           "paramiko-conns": run_paramiko_conns, "paramiko-procs": run_paramiko_procs,
           "ssh2-python": run_ssh2, "ssh-python": run_libssh, "asyncssh": run_asyncssh}
NEEDS = {"ssh2-python": "ssh2", "ssh-python": "ssh", "asyncssh": "asyncssh"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    args = parser.parse_args()
    chosen = []
    for name in args.clients.split(","):
        try:
            if name in NEEDS:
                __import__(NEEDS[name])
            chosen.append(name)
        except ImportError:
            print(f"{name}: not installed, skipped")
    blobs = [os.urandom(BLOB) for _ in range(args.size_mib // 4)]
    gib = len(blobs) * BLOB / (1 << 30)
    results: dict[str, list] = {c: [] for c in chosen}
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="hotvm-sftpc-") as tmp, SshServer() as server:
        image = Path(tmp) / "image.raw"
        with open(image, "wb") as fh:
            for blob in blobs:
                fh.write(blob)
        bench = Bench(server, blobs, args.workers, image)
        for r in range(args.rounds):
            for name in chosen if r % 2 == 0 else reversed(chosen):
                results[name].append(CLIENTS[name](bench))
                for d in server.root_dir.iterdir():  # keep the server's disk small between contenders
                    subprocess.run(["rm", "-rf", str(d)], check=True)
        print(f"{args.size_mib} MiB as 4 MiB blobs, {args.workers} workers, {args.rounds} rounds (medians); "
              f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; cpu = client + server s per GiB")
        base = {i: statistics.median(m[i][0] for m in results["sftp"]) for i in (0, 1)} \
            if "sftp" in results else {}
        for name in chosen:
            line = f"{name:<15}"
            for i, what in ((0, "put"), (1, "get")):
                wall = statistics.median(m[i][0] for m in results[name])
                cl = statistics.median(m[i][1] for m in results[name]) / gib
                sv = statistics.median(m[i][2] for m in results[name]) / gib
                ratio = f" {base[i] / wall:5.2f}x" if base else ""
                line += f"  {what} {gib * 1024 / wall:5.0f} MiB/s{ratio} cpu {cl:4.2f} + {sv:4.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
