"""A pyVmomi session to vCenter/ESXi: login with clear errors, task waits, inventory look-ups, datastore HTTP.

Kept apart from the driver so VSphereDriver (one VM) and VSphereHost (registering VMs) share it.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import urllib3
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from hotvm.config import HostConfig
from hotvm.errors import ConfigError, HypervisorError, HypervisorUnreachable, UnknownVMError

log = logging.getLogger("hotvm.vsphere")

CONNECT_TIMEOUT_S = 30
HTTP_CHUNK = 1 << 20
_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")


def password(host: HostConfig) -> str:
    """The host's password from its environment variable or Prefect Secret block (never from hotvm.yaml)."""
    from hotvm import credentials

    return credentials.password(host, f"password of {host.username}", credentials.host(host)).value or ""


def password_source(host: HostConfig) -> str:
    if host.password_env:
        return f"environment variable {host.password_env}"
    return f"Prefect Secret block '{host.password_secret}'"


def parse_ds_path(ds_path: str) -> tuple[str, str]:
    """'[datastore] dir/file.vmdk' -> ('datastore', 'dir/file.vmdk')."""
    m = _DS_PATH.match(ds_path)
    if m is None:
        raise HypervisorError(f"'{ds_path}' is not a datastore path", "expected '[datastore] dir/file'")
    return m["ds"], m["path"]


@dataclass(frozen=True)
class TaskOutcome:
    result: Any
    seconds: float


class Connection:
    """One logged-in session; `close()` logs out."""

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        if not host.url:
            raise ConfigError(f"vSphere host '{host.name}' has no url", "set url: https://vcenter/sdk")
        parts = urlsplit(host.url)
        self.base = f"{parts.scheme or 'https'}://{parts.netloc}"
        self.verify: bool | str = (
            str(host.verify_tls) if isinstance(host.verify_tls, Path) else bool(host.verify_tls)
        )
        context = ssl.create_default_context(cafile=self.verify if isinstance(self.verify, str) else None)
        if self.verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            self.si = SmartConnect(
                protocol=parts.scheme or "https", host=parts.hostname or "", port=parts.port or 443,
                user=host.username or "", pwd=password(host), path=parts.path or "/sdk", sslContext=context,
                httpConnectionTimeout=CONNECT_TIMEOUT_S,
            )  # fmt: skip
        except vim.fault.InvalidLogin:
            raise ConfigError(
                f"vSphere host '{host.name}': login as {host.username} refused (wrong user name or password)",
                f"check the user name in hotvm.yaml and the password in {password_source(host)}",
            ) from None
        except ssl.SSLError as exc:
            raise HypervisorUnreachable(
                f"vSphere host '{host.name}': TLS failure talking to {self.base}: {exc.reason or exc}",
                "give the CA bundle that signed its certificate as verify_tls: /path/ca.pem "
                "(verify_tls: false only in a test lab)",
            ) from None
        except (TimeoutError, OSError) as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            if isinstance(cause, ssl.SSLError):
                raise HypervisorUnreachable(
                    f"vSphere host '{host.name}': TLS failure talking to {self.base}: {cause}",
                    "give the CA bundle that signed its certificate as verify_tls: /path/ca.pem "
                    "(verify_tls: false only in a test lab)",
                ) from None
            raise HypervisorUnreachable(
                f"vSphere host '{host.name}': cannot reach {host.url}: {exc}",
                "check the url (https://vcenter/sdk) and that vCenter/ESXi is up and reachable from here",
            ) from None
        except Exception as exc:  # pyVim raises a bare Exception when something answers that is no SDK
            if "is not a VIM server" not in str(exc):
                raise
            raise HypervisorUnreachable(
                f"vSphere host '{host.name}': {host.url} does not answer as a vSphere SDK endpoint",
                "the url must be https://<vcenter or esxi host>/sdk",
            ) from None
        self.content = self.si.RetrieveContent()
        cookie = self.si._stub.cookie or ""  # the session the datastore HTTP requests must carry
        if self.verify is False:
            log.warning("vSphere host '%s': TLS certificate NOT verified (verify_tls: false)", host.name)
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # said once, above
        self.http = requests.Session()
        self.http.headers["Cookie"] = cookie.split(";")[0]

    def close(self) -> None:
        self.http.close()
        try:
            Disconnect(self.si)
        except Exception as exc:  # noqa: BLE001 - logout of a dead session must not hide the real outcome
            log.debug("vSphere logout from %s failed: %s", self.host.url, exc)

    # ------------------------------------------------------------------ inventory

    def objects(self, kind: type, props: list[str], root: Any = None) -> dict[Any, dict[str, Any]]:
        """Every object of `kind` under `root` with the given properties, in ONE property-collector call."""
        view = self.content.viewManager.CreateContainerView(root or self.content.rootFolder, [kind], True)
        try:
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[
                    vmodl.query.PropertyCollector.ObjectSpec(
                        obj=view, skip=True,
                        selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView)],
                    )
                ],
                propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=props)],
            )  # fmt: skip
            found: dict[Any, dict[str, Any]] = {}
            result = self.content.propertyCollector.RetrievePropertiesEx(
                [spec], vmodl.query.PropertyCollector.RetrieveOptions()
            )
            while result is not None:
                for obj in result.objects:
                    found[obj.obj] = {p.name: p.val for p in obj.propSet}
                if not result.token:
                    break
                result = self.content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
            return found
        finally:
            view.Destroy()

    def props(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        """Properties of one object through the property collector: unset ones are simply absent (vcsim
        0.24 crashes on a plain accessor for an unset property such as `snapshot`)."""
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj, skip=False)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=paths)],
        )
        result = self.content.propertyCollector.RetrievePropertiesEx(
            [spec], vmodl.query.PropertyCollector.RetrieveOptions()
        )
        return {p.name: p.val for o in (result.objects if result else []) for p in o.propSet}

    def vm_names(self) -> list[str]:
        return sorted(
            props["name"]
            for props in self.objects(vim.VirtualMachine, ["name", "config.template"]).values()
            if not props.get("config.template")
        )

    def find_vm(self, name: str) -> vim.VirtualMachine | None:
        for obj, props in self.objects(vim.VirtualMachine, ["name"]).items():
            if props["name"] == name:
                return obj
        return None

    def vm(self, name: str) -> vim.VirtualMachine:
        found = self.find_vm(name)
        if found is None:
            names = self.vm_names()
            raise UnknownVMError(
                f"vSphere host '{self.host.name}' has no VM named '{name}' "
                f"(it has: {', '.join(names[:20]) or 'none'}{', ...' if len(names) > 20 else ''})",
                "fix the VM name in hotvm.yaml (names are case-sensitive)",
            )
        return found

    @staticmethod
    def datacenter_of(entity: Any) -> vim.Datacenter:
        obj = entity
        while obj is not None and not isinstance(obj, vim.Datacenter):
            obj = obj.parent
        if obj is None:
            raise HypervisorError(f"{entity} is in no datacenter", "check the vSphere inventory")
        return obj

    def inventory_path(self, entity: Any) -> str:
        """'Folder/DC' for a datacenter: what the /folder HTTP interface wants as dcPath."""
        names = []
        obj = entity
        while obj is not None and obj != self.content.rootFolder:
            names.append(obj.name)
            obj = obj.parent
        return "/".join(reversed(names))

    # ------------------------------------------------------------------ tasks

    def wait(
        self,
        task: vim.Task,
        what: str,
        timeout: float,
        between: Callable[[], None] | None = None,
    ) -> TaskOutcome:
        """Poll the task (pyVmomi's WaitForTask trips on simulators' task objects); `between` runs every
        poll (the question check), so a VM that is stuck on a question never hangs the step."""
        t0 = time.monotonic()
        delay = 0.05
        while True:
            # property by property: pyVmomi cannot deserialize a whole TaskInfo whose entity is a snapshot
            info = self.props(task, ["info.state", "info.result", "info.error"])
            state = info.get("info.state")
            if state == vim.TaskInfo.State.success:
                return TaskOutcome(info.get("info.result"), time.monotonic() - t0)
            if state == vim.TaskInfo.State.error:
                fault = info.get("info.error")
                msg = getattr(fault, "msg", "") or type(fault).__name__
                raise HypervisorError(f"{what} failed: {msg}", "see the task in the vSphere Client; rerun")
            if between is not None:
                between()
            if time.monotonic() - t0 > timeout:
                raise HypervisorError(
                    f"{what} did not finish in {timeout:.0f}s (task {task._moId} still {state})",
                    "look at the task in the vSphere Client; raise job_timeout_s for very large disks",
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------------ datastore files over HTTPS

    def _file_url(self, ds_path: str, datacenter: vim.Datacenter) -> tuple[str, dict[str, str]]:
        ds, path = parse_ds_path(ds_path)
        return (
            f"{self.base}/folder/{quote(path)}",
            {"dcPath": self.inventory_path(datacenter), "dsName": ds},
        )

    def download(self, ds_path: str, datacenter: vim.Datacenter, dest: Path) -> int:
        """Stream a datastore file into `dest`; returns its size. Raises FileNotFoundError if absent."""
        url, params = self._file_url(ds_path, datacenter)
        with self.http.get(
            url, params=params, stream=True, timeout=CONNECT_TIMEOUT_S, verify=self.verify
        ) as resp:
            if resp.status_code == 404:
                raise FileNotFoundError(ds_path)
            self._check(resp, "download", ds_path)
            size = 0
            with open(dest, "wb") as fh:
                for chunk in resp.iter_content(HTTP_CHUNK):
                    fh.write(chunk)
                    size += len(chunk)
        return size

    def read(self, ds_path: str, datacenter: vim.Datacenter) -> bytes | None:
        """A small datastore file (config, descriptor) in memory, or None if it does not exist."""
        url, params = self._file_url(ds_path, datacenter)
        resp = self.http.get(url, params=params, timeout=CONNECT_TIMEOUT_S, verify=self.verify)
        if resp.status_code == 404:
            return None
        self._check(resp, "download", ds_path)
        return resp.content

    def upload(self, data: bytes | Path, ds_path: str, datacenter: vim.Datacenter) -> None:
        url, params = self._file_url(ds_path, datacenter)
        if isinstance(data, Path):
            with open(data, "rb") as fh:
                size = {"Content-Length": str(data.stat().st_size)}
                resp = self.http.put(url, params=params, data=fh, timeout=CONNECT_TIMEOUT_S,
                                     verify=self.verify, headers=size)  # fmt: skip
        else:
            resp = self.http.put(url, params=params, data=data, timeout=CONNECT_TIMEOUT_S, verify=self.verify)
        self._check(resp, "upload", ds_path)

    def _check(self, resp: requests.Response, verb: str, ds_path: str) -> None:
        if resp.status_code in (401, 403):
            raise HypervisorError(
                f"vSphere host '{self.host.name}': {verb} of {ds_path} refused (HTTP {resp.status_code})",
                f"give {self.host.username} the Datastore.Browse and Datastore.FileManagement privileges",
            )
        if resp.status_code >= 300:
            raise HypervisorError(
                f"vSphere host '{self.host.name}': {verb} of {ds_path} failed: HTTP {resp.status_code}",
                "check the datastore is accessible from vCenter and has free space",
            )


class LazyConnection:
    """Connects on first use and logs out on close(): a driver that is opened and closed without a call
    (a skipped step, a config check) never logs in to vCenter."""

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(self.host)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
