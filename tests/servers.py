"""Real servers on loopback for tests: Samba, OpenSSH (sftp), pyftpdlib and vsftpd (ftp/ftps), moto (s3).

Each server lives in its own temp dir, listens on 127.0.0.1 on a free high port, gets stdin=DEVNULL and its
own session, and can be stopped and started again on the same port (to test a server that goes away). Use
them as context managers or call start()/stop(); `close()` also removes the temp dir.

    with SambaServer() as smb:
        smb.port, smb.user, smb.password, smb.share_dir

This file is also the FTP server's entry point: `python tests/servers.py ftp ...` (see FtpServer), and a
subreaper to run a server under: `python tests/servers.py reap COMMAND...` (LoopbackServer.reap_all).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class LoopbackServer:
    """One server process: start() waits until its port accepts connections; stop() kills its session."""

    name = "server"
    reap_all = False
    """Run the server under `servers.py reap` (a child subreaper): every process it forks is reaped there,
    so its CPU counts in the server's cumulative CPU even when its own parent exits first (vsftpd's
    per-session processes). For benches that measure the server's CPU."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"hotvm-{self.name}-"))
        os.chmod(self.dir, 0o755)  # servers that switch to an unprivileged user must traverse it
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._prepared = False

    # -- to implement
    def prepare(self) -> None:
        """One-time setup in self.dir (config, keys, users)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    # -- lifecycle
    def start(self) -> LoopbackServer:
        if self.proc and self.proc.poll() is None:
            return self
        if not self._prepared:
            self.prepare()
            self._prepared = True
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            command = self.command()
            if self.reap_all:
                command = [sys.executable, str(Path(__file__).resolve()), "reap", *command]
            self.proc = subprocess.Popen(command, cwd=self.dir, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Kill the server and every process it forked (sshd's per-connection children leave its session:
        without this, open connections would survive, unlike a server that really goes away)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # children of the session (smbd forks one per client) go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(*args: str, input: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=input,
                   stdin=None if input is not None else subprocess.DEVNULL)


class SambaServer(LoopbackServer):
    """`smbd --foreground` with a private smb.conf and tdbsam passdb; share `backups` at self.share_dir.

    Samba maps its users to unix accounts: the Debian `backup` account is used (created if missing).
    """

    name = "smb"
    share = "backups"

    def __init__(self, port: int | None = None, user: str = "backup", password: str = "s3cret-smb",
                 options: dict[str, str] | None = None) -> None:
        """`options`: more [global] settings (e.g. an older `server max protocol`, to test its signing)."""
        super().__init__(port)
        self.user, self.password = user, password
        self.options = options or {}
        self.conf = self.dir / "smb.conf"
        self.share_dir = self.dir / self.share

    def prepare(self) -> None:
        if subprocess.run(["id", self.user], capture_output=True).returncode != 0:
            _run("useradd", "-M", "-s", "/usr/sbin/nologin", self.user)
        for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc"):
            (self.dir / sub).mkdir()
        self.share_dir.mkdir()
        shutil.chown(self.share_dir, self.user)
        d = self.dir
        self.conf.write_text(f"""[global]
  workgroup = WORKGROUP
  server role = standalone server
  smb ports = {self.port}
  bind interfaces only = yes
  interfaces = lo 127.0.0.1
  disable netbios = yes
  private dir = {d}/private
  lock directory = {d}/lock
  state directory = {d}/state
  cache directory = {d}/cache
  pid directory = {d}/pid
  ncalrpc dir = {d}/ncalrpc
  passdb backend = tdbsam:{d}/private/passdb.tdb
  log level = 1
  load printers = no
  printing = bsd
  printcap name = /dev/null
  server min protocol = SMB2_10
{"".join(f"  {k} = {v}{chr(10)}" for k, v in self.options.items())}
[{self.share}]
  path = {self.share_dir}
  read only = no
  valid users = {self.user}
""")
        _run("smbpasswd", "-c", str(self.conf), "-s", "-a", self.user,
             input=f"{self.password}\n{self.password}\n")

    def command(self) -> list[str]:
        return ["smbd", "--foreground", "--no-process-group", "--debug-stdout", f"--configfile={self.conf}"]


class SshServer(LoopbackServer):
    """`sshd -D` with its own host key; root logs in with `client_key` or with `locked_key` (whose passphrase
    is `passphrase`); `known_hosts` lists the host. `password_user` logs in with `password` and owns
    `password_dir`."""

    name = "ssh"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "id_ed25519"
        self.locked_key = self.dir / "id_locked"
        self.passphrase = "s3cret-passphrase"
        self.known_hosts = self.dir / "known_hosts"
        self.root_dir = self.dir / "srv"
        self.user = "root"
        self.password_user, self.password = "hotvmsftp", "s3cret-ssh"
        self.password_dir = self.dir / "pw"

    def prepare(self) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", self.passphrase, "-f", str(self.locked_key))
        (self.dir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text()
                                                  + self.locked_key.with_suffix(".pub").read_text())
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.root_dir.mkdir()
        if subprocess.run(["id", self.password_user], capture_output=True).returncode != 0:
            _run("useradd", "-M", "-s", "/usr/sbin/nologin", self.password_user)
        _run("chpasswd", input=f"{self.password_user}:{self.password}\n")
        self.password_dir.mkdir()
        shutil.chown(self.password_dir, self.password_user)
        (self.dir / "sshd_config").write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication yes
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")

    def command(self) -> list[str]:
        return ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")]


class FtpServer(LoopbackServer):
    """pyftpdlib in a child process; with tls=True it is FTPS (explicit AUTH TLS) with a self-signed cert.

    `cert` is that certificate (give it to the client as its CA file); `root_dir` is the user's home.
    With pipelining=False it answers a command that came in the same read as the one before it with 503
    (as a server that takes one command per read would), to test clients that pipeline commands.
    """

    name = "ftp"

    def __init__(self, port: int | None = None, user: str = "ftpuser", password: str = "s3cret-ftp",
                 tls: bool = False, pipelining: bool = True) -> None:
        super().__init__(port)
        self.user, self.password, self.tls, self.pipelining = user, password, tls, pipelining
        self.root_dir = self.dir / "home"
        self.cert = self.dir / "cert.pem"

    def prepare(self) -> None:
        self.root_dir.mkdir()
        if self.tls:
            _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(self.cert), "-out", str(self.cert))

    def command(self) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "ftp", str(self.port), str(self.root_dir),
               self.user, self.password]
        return [*cmd, str(self.cert)] if self.tls else cmd

    def env(self) -> dict[str, str] | None:
        return None if self.pipelining else {**os.environ, "HOTVM_TEST_FTP_NO_PIPELINING": "1"}


PAM_SERVICE = "hotvm-test-ftp"
PAM_CONFIG = """# hotvm tests (tests/servers.py VsftpdServer): unix passwords only; no pam_shells (the test
# users have a nologin shell) and no delay after a wrong password (tests of one need not wait 2 s)
auth     required pam_unix.so nodelay
account  required pam_unix.so
session  required pam_permit.so
"""


def _retry_locked(*args: str, input: str | None = None) -> None:
    """useradd/chpasswd/userdel, again while another test worker holds the lock on /etc/passwd."""
    for attempt in range(50):
        try:
            _run(*args, input=input)
            return
        except subprocess.CalledProcessError as exc:
            if "lock" not in (exc.stderr or "") or attempt == 49:
                raise
            time.sleep(0.1)


class VsftpdServer(LoopbackServer):
    """vsftpd (Debian package) with its own config; with tls=True it is FTPS (explicit AUTH TLS, PROT P
    required for logins and data) with a self-signed cert and vsftpd's default require_ssl_reuse=YES: every
    data connection must resume the control connection's TLS session.

    vsftpd logs in real unix users: each server makes its own (`hotvmftp-<random>`, a random password, a
    nologin shell, home = `root_dir` in the temp dir, chrooted there) and removes it in close(). Its PAM
    service is `/etc/pam.d/hotvm-test-ftp` (Debian's vsftpd one refuses shells not in /etc/shells, and
    pam_unix waits 2 s after a wrong password), written here once. Same attributes as FtpServer: user,
    password, root_dir, cert, port.
    """

    name = "vsftpd"
    binary = "/usr/sbin/vsftpd"

    def __init__(self, port: int | None = None, tls: bool = False,
                 options: dict[str, str] | None = None) -> None:
        """`options`: more vsftpd.conf settings (e.g. require_ssl_reuse=NO)."""
        super().__init__(port)
        self.tls, self.options = tls, options or {}
        self.user = f"hotvmftp-{secrets.token_hex(4)}"
        self.password = secrets.token_urlsafe(12)
        self.root_dir = self.dir / "home"
        self.cert = self.dir / "cert.pem"
        self.conf = self.dir / "vsftpd.conf"
        self._user_made = False

    @staticmethod
    def available() -> bool:
        return Path(VsftpdServer.binary).exists()

    def prepare(self) -> None:
        pam = Path("/etc/pam.d") / PAM_SERVICE
        if not pam.exists() or pam.read_text() != PAM_CONFIG:
            tmp = pam.with_name(f".{PAM_SERVICE}.{os.getpid()}")
            tmp.write_text(PAM_CONFIG)
            tmp.replace(pam)
        self.root_dir.mkdir()  # before the user: a test user whose home is gone is a leftover
        (self.dir / "empty").mkdir()  # secure_chroot_dir: root's, empty
        self._remove_leftover_users()
        _retry_locked("useradd", "-M", "-d", str(self.root_dir), "-s", "/usr/sbin/nologin", self.user)
        self._user_made = True
        _retry_locked("chpasswd", input=f"{self.user}:{self.password}\n")
        shutil.chown(self.root_dir, self.user)
        self.root_dir.chmod(0o700)
        pasv = free_port()
        settings = {
            "listen": "YES", "listen_ipv6": "NO", "listen_address": "127.0.0.1",
            "listen_port": str(self.port),
            "background": "NO", "anonymous_enable": "NO", "local_enable": "YES", "write_enable": "YES",
            "local_umask": "077", "chroot_local_user": "YES", "allow_writeable_chroot": "YES",
            "secure_chroot_dir": str(self.dir / "empty"), "pam_service_name": PAM_SERVICE,
            "pasv_enable": "YES", "pasv_address": "127.0.0.1", "pasv_min_port": str(pasv),
            "pasv_max_port": str(min(pasv + 200, 65535)), "connect_from_port_20": "NO",
            "max_clients": "64", "max_per_ip": "64", "seccomp_sandbox": "NO",
            "xferlog_enable": "NO", "vsftpd_log_file": str(self.dir / "vsftpd.log"),
            "delay_failed_login": "0", "ftpd_banner": "hotvm test vsftpd",
        }
        if self.tls:
            _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(self.cert), "-out", str(self.cert))
            settings.update({"ssl_enable": "YES", "rsa_cert_file": str(self.cert),
                             "rsa_private_key_file": str(self.cert), "force_local_logins_ssl": "YES",
                             "force_local_data_ssl": "YES", "ssl_tlsv1": "YES"})
        settings.update(self.options)
        self.conf.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))

    @staticmethod
    def _remove_leftover_users() -> None:
        """Users of servers that were never closed (a killed test run): their home (a temp dir) is gone."""
        for line in Path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 5 and fields[0].startswith("hotvmftp-") and not Path(fields[5]).exists():
                with contextlib.suppress(subprocess.CalledProcessError):
                    _retry_locked("userdel", fields[0])

    def command(self) -> list[str]:
        return [self.binary, str(self.conf)]

    def close(self) -> None:
        super().close()
        if self._user_made:
            self._user_made = False
            with contextlib.suppress(subprocess.CalledProcessError):
                _retry_locked("userdel", self.user)


class MotoServer(LoopbackServer):
    """`moto_server` (S3 and IAM in memory). With auth=True, requests must be signed by a key made with
    `make_user()` (moto enforces IAM once INITIAL_NO_AUTH_ACTION_COUNT unauthenticated calls are used up)."""

    name = "s3"

    def __init__(self, port: int | None = None, auth: bool = True) -> None:
        super().__init__(port)
        self.auth = auth
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        moto = Path(sys.executable).with_name("moto_server")
        return [str(moto), "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
        return env

    def make_user(self, bucket: str) -> tuple[str, str]:
        """Create an IAM user allowed everything and `bucket`; return its (access key, secret key).

        Uses the first unauthenticated calls: call it once, right after start()."""
        import boto3

        kw = {"endpoint_url": self.endpoint_url, "region_name": "us-east-1",
              "aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="hotvm")
        iam.put_user_policy(UserName="hotvm", PolicyName="all", PolicyDocument=(
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'))
        key = iam.create_access_key(UserName="hotvm")["AccessKey"]
        access, secret = key["AccessKeyId"], key["SecretAccessKey"]
        s3 = boto3.client("s3", **{**kw, "aws_access_key_id": access, "aws_secret_access_key": secret})
        s3.create_bucket(Bucket=bucket)
        return access, secret


def _one_command_per_read(base: type) -> type:
    """A handler that refuses (503) every command after the first of one read from the client."""

    class OneCommandPerRead(base):
        _reads = 0
        _last_read = -1

        def handle_read(self) -> None:
            self._reads += 1
            super().handle_read()

        def found_terminator(self) -> None:
            if self._last_read == self._reads:
                self._in_buffer = []
                self._in_buffer_len = 0
                self.respond("503 Bad sequence of commands: one command at a time, please.")
                return
            self._last_read = self._reads
            super().found_terminator()

    return OneCommandPerRead


def _ftp_main(port: str, root: str, user: str, password: str, cert: str | None = None) -> None:
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
    from pyftpdlib.servers import FTPServer

    authorizer = DummyAuthorizer()
    authorizer.add_user(user, password, root, perm="elradfmwMT")
    handler = TLS_FTPHandler if cert else FTPHandler
    if os.environ.get("HOTVM_TEST_FTP_NO_PIPELINING"):
        handler = _one_command_per_read(handler)
    if cert:
        handler.certfile = cert
        handler.tls_control_required = True
        handler.tls_data_required = True
    handler.authorizer = authorizer
    handler.auth_failed_timeout = 0  # tests of a wrong password need not wait 3 s
    handler.banner = "hotvm test ftp"
    import logging

    logging.basicConfig(level=logging.WARNING)
    server = FTPServer(("127.0.0.1", int(port)), handler)
    server.max_cons = 64
    server.serve_forever()


def _reap_main(command: list[str]) -> None:
    """Start `command` and reap every process that ends below it (PR_SET_CHILD_SUBREAPER), until none is
    left: then this process's cutime/cstime hold the CPU of all of them (LoopbackServer.reap_all)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    os.posix_spawnp(command[0], command, os.environ)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "ftp":
        _ftp_main(*sys.argv[2:])
    elif len(sys.argv) >= 3 and sys.argv[1] == "reap":
        _reap_main(sys.argv[2:])
    else:
        sys.exit("usage: servers.py ftp PORT ROOT USER PASSWORD [CERTFILE] | servers.py reap COMMAND...")
