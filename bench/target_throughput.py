"""Backup and restore throughput to each target scheme vs a plain copy of the same bytes to and from the same
server, in one run.

    .venv/bin/python bench/target_throughput.py [--size-mib 1024] [--rounds 1]
                                                [--schemes file,smb,sftp,ftp,ftps,s3] [--library]
                                                [--before-target OLD_MODULE.py]
                                                [--ftp-server vsftpd|pyftpdlib]

hotvm: `export_image` of a raw image full of random data (nothing compresses, nothing is zero) into a fresh
repository (`repo.ensure()` first, not timed), under a fresh prefix every round so no chunk is deduplicated.
Plain: the standard tool copies the same file to the same loopback server (tests/servers.py):
  file  `cp` into a directory, then `sync` (hotvm's file target fsyncs every chunk: `sync` after it too)
  smb   `smbclient put` (Debian package smbclient, in scripts/install-system-deps.sh), told to sign every
        message as hotvm does (smbprotocol requires signing; smbclient by default signs only the session
        setup, which smbstatus shows as "partial(AES-128-GMAC)"): like with like
  sftp  OpenSSH `sftp -b` (batch mode) with the test key
  ftp   `curl -T`;  ftps: `curl --ssl-reqd --cacert` (explicit TLS, like hotvm's ftps://). Also, like
        with like, `lftp mput` of the image cut into 4 MiB files (what hotvm stores: one file per chunk)
        over one connection, when lftp is installed: FTP opens a data connection per file, so many files
        cost the server more than one stream, whoever sends them.
        The FTP server is vsftpd (--ftp-server, default; FTPS with its default require_ssl_reuse=YES) or
        pyftpdlib. vsftpd is the default because it is what users run (NAS boxes, Linux hosts): a C server
        with a process per connection, so hotvm's 4 connections are served in parallel as they would be,
        where pyftpdlib, single-threaded Python on the same 2 CPUs, made the FTP figures measure its own
        per-file cost. vsftpd's session processes outlive their parents, so its server runs under
        `servers.py reap` (a subreaper) for its CPU to be counted; each login costs it ~45 ms of CPU (PAM
        and the user's yescrypt hash): 4 for hotvm's connections, 1 for curl or lftp.
  s3    s3fs `put` (fsspec; multipart upload) to moto
The image is read from the page cache by both. A `sync` (not timed) precedes every copy; the order of plain
and hotvm alternates between rounds.
Restore (the `get` lines; --no-restore skips them): hotvm `restore_disk` of the set just written, as a raw
file, vs the plain tool fetching its own copy back (`cp`, `smbclient get`, `sftp get`, `curl -o`, s3fs `get`);
both write to local disk and a timed `sync` follows both (restore_disk fsyncs its output; on a local disk
file system it writes O_DIRECT, past the page cache).
--library adds a line per direction for the scheme's Python library alone (smbprotocol, ftplib; for sftp the
ssh child with targets/sftpwire.py, 4 MiB files one after the other) copying the whole image in one stream
over the target's own connection: no hashing, compression or chunking.
It is the floor hotvm cannot go under while it keeps that library.
--before-target FILE times a second hotvm, `open_<scheme>()` of FILE (a targets/<scheme>.py from another
commit: `git show main:targets/ftp.py > /tmp/ftp_main.py`) in the same rounds: before -> after from one run.
Every round runs each contender once, the order reversed every other round; the figures are medians.
CPU per GiB (client + server, user + sys) is printed next to each: on this shared machine it moves far less
than wall time.
Targets (issues #4, #15): hotvm >= 0.8x the plain tool's throughput, both ways, and never below 1 GbE line
rate (118 MiB/s).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from _common import client_cpu, machine_load, median, process_cpu, write_random_extents  # noqa: E402
from servers import FtpServer, MotoServer, SambaServer, SshServer, VsftpdServer, _descendants  # noqa: E402

from hotvm.config import TargetConfig  # noqa: E402
from hotvm.formats.export import export_image  # noqa: E402
from hotvm.formats.manifest import DiskRecord  # noqa: E402
from hotvm.formats.repository import Repository  # noqa: E402
from hotvm.formats.restore import restore_disk  # noqa: E402
from targets import Target, open_target  # noqa: E402

SCHEMES = ["file", "smb", "sftp", "ftp", "ftps", "s3"]
BUCKET = "hotvm-bench"
TARGET_RATIO = 0.8
LINE_RATE_MIB_S = 118  # 1 GbE


def sh(*args: str, input: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=input)


class Scheme:
    """One scheme: its server, a target config under a fresh prefix, the plain copy, cleanup."""

    name = ""
    sync_after = False  # time a `sync` after both contenders (local disk only)

    def __init__(self, work: Path) -> None:
        self.work = work

    def start(self) -> None:
        pass

    def server_cpu(self, settle: bool = True) -> float:
        return 0.0

    def stop(self) -> None:
        pass

    def config(self, tag: str) -> TargetConfig:
        raise NotImplementedError

    def plain(self, image: Path, tag: str) -> None:
        raise NotImplementedError

    def plain_get(self, tag: str, dest: Path) -> None:
        """Fetch the plain copy of round `tag` back into the local file `dest`."""
        raise NotImplementedError

    def more_plain(self, image: Path) -> dict[str, Callable[[str], None]]:
        """Other plain copies of the same bytes to time alongside (label -> copy(tag)); prepared here."""
        return {}

    def cleanup(self, tag: str) -> None:
        raise NotImplementedError


class FileScheme(Scheme):
    name = "file"
    sync_after = True

    def config(self, tag: str) -> TargetConfig:
        return TargetConfig(name="bench-file", url=f"file://{self.work}/file-{tag}")

    def plain(self, image: Path, tag: str) -> None:
        dest = self.work / f"plain-{tag}"
        dest.mkdir()
        sh("cp", str(image), f"{dest}/")

    def plain_get(self, tag: str, dest: Path) -> None:
        sh("cp", str(self.work / f"plain-{tag}" / "random.raw"), str(dest))

    def cleanup(self, tag: str) -> None:
        for d in (f"file-{tag}", f"plain-{tag}"):
            shutil.rmtree(self.work / d, ignore_errors=True)


class ServerScheme(Scheme):
    server: SambaServer | SshServer | FtpServer | MotoServer
    idle_children = 0

    def server_cpu(self, settle: bool = True) -> float:
        """CPU of the server and its children. smbd and sshd fork one child per connection: with `settle`,
        wait until those of the run are gone, so that all their CPU is in the parent's cutime/cstime."""
        proc = self.server.proc
        assert proc is not None
        deadline = time.monotonic() + 5
        while settle and len(_descendants(proc.pid)) > self.idle_children and time.monotonic() < deadline:
            time.sleep(0.05)
        return sum(process_cpu(pid) for pid in (proc.pid, *_descendants(proc.pid)))

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.close()


SMBCLIENT_SIGNING = "--option=client signing=required"
"""hotvm signs every SMB message (AES-GMAC with smbd): the plain copy signs too. Unsigned, smbclient spent
0.45 s of client CPU per 512 MiB here, signed 0.50 s."""


class SmbScheme(ServerScheme):
    name = "smb"

    def start(self) -> None:
        self.server = SambaServer().start()
        self.idle_children = len(_descendants(self.server.proc.pid))
        os.environ["HOTVM_BENCH_SMB_PASSWORD"] = self.server.password
        self.auth = self.work / "smb-auth"
        self.auth.write_text(f"username = {self.server.user}\npassword = {self.server.password}\n")
        self.auth.chmod(0o600)

    def config(self, tag: str) -> TargetConfig:
        s = self.server
        return TargetConfig(name="bench-smb", url=f"smb://{s.user}@127.0.0.1:{s.port}/{s.share}/hotvm-{tag}",
                            password_env="HOTVM_BENCH_SMB_PASSWORD")

    def plain(self, image: Path, tag: str) -> None:
        s = self.server
        sh("smbclient", f"//127.0.0.1/{s.share}", "-p", str(s.port), "-A", str(self.auth), SMBCLIENT_SIGNING,
           "-c", f"put {image} plain-{tag}.raw")

    def plain_get(self, tag: str, dest: Path) -> None:
        s = self.server
        sh("smbclient", f"//127.0.0.1/{s.share}", "-p", str(s.port), "-A", str(self.auth), SMBCLIENT_SIGNING,
           "-c", f"get plain-{tag}.raw {dest}")

    def cleanup(self, tag: str) -> None:
        shutil.rmtree(self.server.share_dir / f"hotvm-{tag}", ignore_errors=True)
        (self.server.share_dir / f"plain-{tag}.raw").unlink(missing_ok=True)


class SftpScheme(ServerScheme):
    name = "sftp"

    def start(self) -> None:
        self.server = SshServer().start()
        self.idle_children = len(_descendants(self.server.proc.pid))

    def config(self, tag: str) -> TargetConfig:
        s = self.server
        return TargetConfig(name="bench-sftp", url=f"sftp://root@127.0.0.1:{s.port}{s.root_dir}/hotvm-{tag}",
                            key_file=s.client_key, known_hosts=s.known_hosts)

    def _sftp(self, command: str) -> None:
        s = self.server
        sh("sftp", "-q", "-b", "-", "-P", str(s.port), "-i", str(s.client_key),
           "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "StrictHostKeyChecking=yes",
           "-o", "BatchMode=yes", "root@127.0.0.1", input=command + "\n")

    def plain(self, image: Path, tag: str) -> None:
        self._sftp(f"put {image} {self.server.root_dir}/plain-{tag}.raw")

    def plain_get(self, tag: str, dest: Path) -> None:
        self._sftp(f"get {self.server.root_dir}/plain-{tag}.raw {dest}")

    def cleanup(self, tag: str) -> None:
        shutil.rmtree(self.server.root_dir / f"hotvm-{tag}", ignore_errors=True)
        (self.server.root_dir / f"plain-{tag}.raw").unlink(missing_ok=True)


FTP_SERVERS: dict[str, type[FtpServer] | type[VsftpdServer]] = {"vsftpd": VsftpdServer,
                                                                 "pyftpdlib": FtpServer}


class FtpScheme(ServerScheme):
    name = "ftp"
    tls = False
    server_class: type[FtpServer] | type[VsftpdServer] = VsftpdServer  # --ftp-server

    def start(self) -> None:
        server = self.server_class(tls=self.tls)
        server.reap_all = True  # vsftpd's session processes outlive their parents: count their CPU too
        self.server = server.start()
        self.idle_children = len(_descendants(self.server.proc.pid))
        os.environ["HOTVM_BENCH_FTP_PASSWORD"] = self.server.password

    def config(self, tag: str) -> TargetConfig:
        s = self.server
        return TargetConfig(name=f"bench-{self.name}", url=f"{self.name}://{s.user}@127.0.0.1:{s.port}/hotvm-{tag}",
                            password_env="HOTVM_BENCH_FTP_PASSWORD",
                            options={"ca_file": str(s.cert)} if self.tls else {})

    def _curl(self, tag: str, *args: str) -> None:
        s = self.server
        tls = ["--ssl-reqd", "--cacert", str(s.cert)] if self.tls else []
        sh("curl", "-sS", "--fail", *tls, "-u", f"{s.user}:{s.password}", *args,
           f"ftp://127.0.0.1:{s.port}/plain-{tag}.raw")

    def plain(self, image: Path, tag: str) -> None:
        self._curl(tag, "-T", str(image))

    def plain_get(self, tag: str, dest: Path) -> None:
        self._curl(tag, "-o", str(dest))

    def more_plain(self, image: Path) -> dict[str, Callable[[str], None]]:
        """lftp `mput` of the image cut into 4 MiB files (not timed), one connection: one file per chunk, as
        hotvm stores it (the chunks' zstd frames are ~100 bytes longer)."""
        if not shutil.which("lftp"):
            print("  (no lftp: the like-with-like line is skipped; apt-get install lftp)", flush=True)
            return {}
        pieces = self.work / "pieces"
        if not pieces.exists():
            pieces.mkdir()
            with open(image, "rb") as fh:
                for i, block in enumerate(iter(lambda: fh.read(4 << 20), b"")):
                    (pieces / f"{i:05d}").write_bytes(block)
        self.pieces = sorted(str(p) for p in pieces.iterdir())
        return {f"lftp mput {len(self.pieces)} x 4 MiB": self._lftp_mput}

    def _lftp_mput(self, tag: str) -> None:
        s = self.server
        tls = (f"set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:ca-file {s.cert}; "
               if self.tls else "set ftp:ssl-allow false; ")
        script = (f"{tls}set net:max-retries 1; open -u {s.user},{s.password} -p {s.port} 127.0.0.1; "
                  f"mkdir plain-{tag}.d; cd plain-{tag}.d; mput {' '.join(self.pieces)}")
        sh("lftp", "-c", script)

    def cleanup(self, tag: str) -> None:
        shutil.rmtree(self.server.root_dir / f"hotvm-{tag}", ignore_errors=True)
        shutil.rmtree(self.server.root_dir / f"plain-{tag}.d", ignore_errors=True)
        (self.server.root_dir / f"plain-{tag}.raw").unlink(missing_ok=True)


class FtpsScheme(FtpScheme):
    name = "ftps"
    tls = True


class S3Scheme(ServerScheme):
    name = "s3"

    def start(self) -> None:
        self.server = MotoServer(auth=True).start()
        self.idle_children = len(_descendants(self.server.proc.pid))
        self.access, self.secret = self.server.make_user(BUCKET)
        os.environ["HOTVM_BENCH_S3_KEY"] = self.access
        os.environ["HOTVM_BENCH_S3_SECRET"] = self.secret

    def _fs(self):
        from s3fs import S3FileSystem

        return S3FileSystem(key=self.access, secret=self.secret, skip_instance_cache=True,
                            client_kwargs={"endpoint_url": self.server.endpoint_url})

    def config(self, tag: str) -> TargetConfig:
        return TargetConfig(name="bench-s3", url=f"s3://{BUCKET}/hotvm-{tag}",
                            endpoint_url=self.server.endpoint_url,
                            access_key_env="HOTVM_BENCH_S3_KEY", secret_key_env="HOTVM_BENCH_S3_SECRET")

    def plain(self, image: Path, tag: str) -> None:
        self._fs().put(str(image), f"{BUCKET}/plain-{tag}.raw")

    def plain_get(self, tag: str, dest: Path) -> None:
        self._fs().get(f"{BUCKET}/plain-{tag}.raw", str(dest))

    def cleanup(self, tag: str) -> None:  # moto keeps objects in memory
        fs = self._fs()
        for path in (f"{BUCKET}/hotvm-{tag}", f"{BUCKET}/plain-{tag}.raw"):
            if fs.exists(path):
                fs.rm(path, recursive=True)


CLASSES: dict[str, type[Scheme]] = {c.name: c for c in (FileScheme, SmbScheme, SftpScheme, FtpScheme,
                                                        FtpsScheme, S3Scheme)}


class Measured:
    """Wall time and CPU seconds (client side, server side) of one copy."""

    def __init__(self, scheme: Scheme, sync_after: bool | None = None) -> None:
        self.scheme = scheme
        self.sync_after = scheme.sync_after if sync_after is None else sync_after

    def __enter__(self) -> Measured:
        sh("sync")  # dirty pages of the previous copy are not this one's to write
        self.client0, self.server0 = client_cpu(), self.scheme.server_cpu(settle=False)
        self.start = time.perf_counter()
        return self

    def stop_clock(self) -> None:
        if self.sync_after:
            sh("sync")
        self.wall = time.perf_counter() - self.start

    def __exit__(self, *exc: object) -> None:
        self.client = client_cpu() - self.client0
        self.server = self.scheme.server_cpu() - self.server0


def run_copy(scheme: Scheme, copy: Callable[[str], None], tag: str) -> Measured:
    with Measured(scheme) as m:
        copy(tag)
        m.stop_clock()
    return m


def run_plain(scheme: Scheme, image: Path, tag: str) -> Measured:
    with Measured(scheme) as m:
        scheme.plain(image, tag)
        m.stop_clock()
    return m


def run_hotvm(scheme: Scheme, image: Path, tag: str,
              opener: Callable[[TargetConfig], Target] = open_target) -> tuple[Measured, DiskRecord]:
    target = opener(scheme.config(tag))
    try:
        repo = Repository(target)
        repo.ensure()
        with Measured(scheme) as m:
            record = export_image(repo, device="bench", image=str(image), fmt="raw")
            m.stop_clock()
            target.close()  # inside the CPU window: the server's per-connection children end with it
    finally:
        target.close()
    return m, record


def run_plain_get(scheme: Scheme, tag: str) -> Measured:
    dest = scheme.work / f"get-plain-{tag}.raw"
    try:
        with Measured(scheme, sync_after=True) as m:
            scheme.plain_get(tag, dest)
            m.stop_clock()
    finally:
        dest.unlink(missing_ok=True)
    return m


def run_hotvm_get(scheme: Scheme, tag: str, record: DiskRecord) -> Measured:
    dest = scheme.work / f"get-hotvm-{tag}.raw"
    target = open_target(scheme.config(tag))
    try:
        with Measured(scheme, sync_after=True) as m:
            restore_disk(Repository(target), record, dest, fmt="raw")
            m.stop_clock()
            target.close()
    finally:
        target.close()
        dest.unlink(missing_ok=True)
    return m


LIBRARY = {"smb": "smbprotocol", "sftp": "ssh+sftpwire", "ftp": "ftplib", "ftps": "ftplib"}


def run_library(scheme: Scheme, image: Path, tag: str, get: bool) -> Measured:
    """The scheme's Python library alone copying the whole image in one stream, through the target's own
    connection (no hashing, no compression, no chunking): what that library costs per byte, hotvm's floor on
    this scheme while it keeps the library. Written to lib.raw next to the repository."""
    target = open_target(scheme.config(tag))
    local = scheme.work / f"lib-{tag}.raw"
    block = 4 << 20
    try:
        target._makedirs(target.root)  # noqa: SLF001 - a bench reaching into the target on purpose
        remote = target.full("lib.raw")
        with Measured(scheme, sync_after=get) as m:
            with target._session() as session:  # noqa: SLF001
                if scheme.name == "smb":
                    import smbclient

                    unc = target._unc(remote)  # type: ignore[attr-defined]  # noqa: SLF001
                    with smbclient.open_file(unc, "rb" if get else "wb", buffering=0, **session) as fh, \
                            open(local if get else image, "wb" if get else "rb") as fl:
                        shutil.copyfileobj(fh if get else fl, fl if get else fh, block)
                elif scheme.name == "sftp":  # one ssh session; the image as 4 MiB files (no offsets)
                    if get:
                        with open(local, "wb") as fl:
                            for i in range(image.stat().st_size // block):
                                fl.write(session.read_file(f"{remote}.{i}"))
                    else:
                        with open(image, "rb") as fl:
                            for i, piece in enumerate(iter(lambda: fl.read(block), b"")):
                                session.write_file(f"{remote}.{i}", piece)
                else:
                    with open(local if get else image, "wb" if get else "rb") as fl:
                        if get:
                            session.retrbinary(f"RETR {remote}", fl.write, blocksize=1 << 20)
                        else:
                            session.storbinary(f"STOR {remote}", fl, blocksize=1 << 20)
                m.stop_clock()
            target.close()  # in the CPU window: a child process (ssh) is reaped in it
    finally:
        target.close()
        local.unlink(missing_ok=True)
    return m


def load_opener(path: str, scheme: str) -> Callable[[TargetConfig], Target]:
    """open_<scheme>() of another version of a target module (--before-target)."""
    spec = importlib.util.spec_from_file_location(f"targets._before_{scheme}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return getattr(module, f"open_{'ftp' if scheme == 'ftps' else scheme}")


def bench_scheme(scheme: Scheme, image: Path, rounds: int, size: int, restore: bool, library: bool,
                 before: str | None = None) -> bool:
    plain: list[Measured] = []
    hotvm: list[Measured] = []
    plain_get: list[Measured] = []
    hotvm_get: list[Measured] = []
    lib: list[Measured] = []
    lib_get: list[Measured] = []
    library = library and scheme.name in LIBRARY
    more = scheme.more_plain(image)
    more_runs: dict[str, list[Measured]] = {label: [] for label in more}
    old: list[Measured] = []
    records: list[DiskRecord] = []
    old_opener = load_opener(before, scheme.name) if before else None
    for i in range(rounds):
        tag = uuid.uuid4().hex[:8]
        try:
            if library:
                lib.append(run_library(scheme, image, tag, get=False))
                if restore:
                    lib_get.append(run_library(scheme, image, tag, get=True))
            def hotvm_put(tag: str) -> None:
                m, record = run_hotvm(scheme, image, tag)
                hotvm.append(m)
                records.append(record)

            def old_put(tag: str) -> None:
                assert old_opener is not None
                old.append(run_hotvm(scheme, image, f"{tag}-before", old_opener)[0])
                scheme.cleanup(f"{tag}-before")

            contenders: list[Callable[[str], None]] = [
                lambda tag: plain.append(run_plain(scheme, image, tag))]
            for label, copy in more.items():
                contenders.append(lambda tag, label=label, copy=copy:
                                  more_runs[label].append(run_copy(scheme, copy, tag)))
            contenders.append(hotvm_put)
            if old_opener is not None:
                contenders.append(old_put)
            for run in contenders if i % 2 == 0 else reversed(contenders):
                run(tag)
            record = records[-1]
            if restore:
                if i % 2 == 0:
                    plain_get.append(run_plain_get(scheme, tag))
                    hotvm_get.append(run_hotvm_get(scheme, tag, record))
                else:
                    hotvm_get.append(run_hotvm_get(scheme, tag, record))
                    plain_get.append(run_plain_get(scheme, tag))
        finally:
            scheme.cleanup(tag)
    met = report(f"{scheme.name:<5} put", plain, hotvm, size)
    for label, runs in more_runs.items():
        report(f"{scheme.name:<5} put", runs, hotvm, size, plain_name=label)
    if old:
        report(f"{scheme.name:<5} put", plain, old, size, library="before")
    if library:
        report(f"{scheme.name:<5} put", plain, lib, size, LIBRARY[scheme.name])
    if restore:
        met = report(f"{scheme.name:<5} get", plain_get, hotvm_get, size) and met
        if library:
            report(f"{scheme.name:<5} get", plain_get, lib_get, size, LIBRARY[scheme.name])
    return met


def report(label: str, plain: list[Measured], hotvm: list[Measured], size: int, library: str = "",
           plain_name: str = "plain") -> bool:
    """One line: both contenders' medians, the ratio and whether the goal (ratio and line rate) is met.
    With `library`, the second contender is that library's bulk copy (--library) or the hotvm of
    --before-target ("before"), not hotvm; `plain_name` names another plain copy than the scheme's tool."""

    def summary(runs: list[Measured]) -> tuple[float, str]:
        wall = median([r.wall for r in runs])
        per_gib = median([r.client + r.server for r in runs]) / (size / (1 << 30))
        return wall, (f"{wall:6.2f} s {size / (1 << 20) / wall:6.0f} MiB/s  cpu "
                      f"{median([r.client for r in runs]):4.2f} + {median([r.server for r in runs]):4.2f} s "
                      f"({per_gib:4.2f} s/GiB)")

    def cpu(runs: list[Measured]) -> float:
        return median([r.client + r.server for r in runs])

    plain_s, plain_text = summary(plain)
    hotvm_s, hotvm_text = summary(hotvm)
    ratio = plain_s / hotvm_s
    line_rate = size / (1 << 20) / hotvm_s >= LINE_RATE_MIB_S
    met = ratio >= TARGET_RATIO and line_rate
    if library:
        what = ("hotvm of --before-target" if library == "before"
                else "the library alone, one stream: hotvm's floor with it")
        print(f"{label}  {plain_name} {plain_text}   {library:<11} {hotvm_text}   {ratio:5.2f}x  "
              f"cpu {cpu(plain) / cpu(hotvm):4.2f}x  ({what})", flush=True)
        return met
    print(f"{label}  {plain_name} {plain_text}   hotvm       {hotvm_text}   {ratio:5.2f}x  "
          f"cpu {cpu(plain) / cpu(hotvm):4.2f}x  {'met' if met else 'MISSED'}"
          f"{'' if line_rate else ' (below 1 GbE)'}", flush=True)
    return met


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of: "
                        + ", ".join(SCHEMES))
    parser.add_argument("--no-restore", action="store_true", help="measure backups only")
    parser.add_argument("--library", action="store_true",
                        help="also time the scheme's library alone (smbprotocol, ssh+sftpwire, ftplib)")
    parser.add_argument("--before-target", default=None, metavar="FILE",
                        help="also time hotvm with open_<scheme>() of this older targets/<scheme>.py")
    parser.add_argument("--ftp-server", choices=list(FTP_SERVERS), default="vsftpd",
                        help="the ftp/ftps server (default vsftpd: what NAS boxes and Linux hosts run)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in CLASSES]
    if unknown:
        parser.error(f"unknown scheme(s): {', '.join(unknown)}")
    if "smb" in chosen and not shutil.which("smbclient"):
        sys.exit("smb needs smbclient for the plain copy: apt-get install smbclient")
    size = args.size_mib << 20
    FtpScheme.server_class = FTP_SERVERS[args.ftp_server]
    if args.ftp_server == "vsftpd" and {"ftp", "ftps"} & set(chosen) and not VsftpdServer.available():
        sys.exit("ftp/ftps need vsftpd (apt-get install vsftpd), or --ftp-server pyftpdlib")

    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="hotvm-bench-") as tmp:
        work = Path(tmp)
        image = work / "random.raw"
        write_random_extents(str(image), size, 1.0)
        sh("sh", "-c", f"cat {image} > /dev/null")  # both contenders read it from the page cache
        print(f"image {args.size_mib} MiB of random data, {args.rounds} round(s), "
              f"{'medians, ' if args.rounds > 1 else ''}reads from the page cache; {machine_load()}",
              flush=True)
        if {"ftp", "ftps"} & set(chosen):
            print(f"ftp/ftps server: {args.ftp_server}", flush=True)
        print(f"ratio = hotvm throughput / plain throughput (target >= {TARGET_RATIO}x and >= "
              f"{LINE_RATE_MIB_S} MiB/s); put = backup, get = restore; cpu = client + server CPU seconds; "
              "cpu ...x = plain CPU / hotvm CPU (what the ratio tends to on a CPU-bound, shared machine)",
              flush=True)
        started: list[Scheme] = []
        try:
            for name in chosen:
                scheme = CLASSES[name](work)
                started.append(scheme)
                scheme.start()
                bench_scheme(scheme, image, args.rounds, size, restore=not args.no_restore,
                             library=args.library, before=args.before_target)
                scheme.stop()
        finally:
            for scheme in started:
                scheme.stop()
        print(f"end: {machine_load()}")


if __name__ == "__main__":
    main()
