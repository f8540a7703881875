"""The Prefect UI as the control room (docs/scale-out.md, docs/notifications.md), end to end against a real
`prefect server start` (the session server), real `prefect worker start` processes (one per host queue
plus the fleet worker), real QEMU VMs and a webhook receiver on loopback:

- `weekly-image` starts one `backup-vm` run per VM on the VM's host's queue, named after the VM;
- one VM's backup fails (its directory on the target is blocked): its run and the parent end Failed, the
  other VM's run Completed; the server's automation posts a message naming the failed VM and its step;
- after the cause is removed, `prefect flow-run retry` of the failed child completes it, the other VM is
  not backed up again, a retried parent runs nothing twice, and the set restores byte-identical;
- a scheduled run that no worker picks up is reported as late;
- the same failure arrives by e-mail (an SMTP server on loopback), sent by the server's automation
  through hotvm's e-mail block;
- `verify` and `recover` start one verify-vm / recover-vm run per VM on the VM's host's queue.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from helpers import hotvm
from qemu_helpers import DiskSpec, start_qemu

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class Receiver:
    """A webhook endpoint on loopback that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        received = self.messages = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/ops"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *words: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if all(w in m.get("text", "") for w in words):
                    return m["text"]
            time.sleep(0.5)
        raise AssertionError(f"no message with {words}; got {[m.get('text') for m in self.messages]}")


def prefect(*args: str, env: dict | None = None, timeout: float = 180) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def wait_final(client, run_id, timeout: float = 240):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not final after {timeout} s: {run.state}")


def manifests(target: Path, vm: str) -> list[Path]:
    return sorted((target / "vms" / vm).glob("*/manifest.json"))


class Mailbox:
    """An SMTP server on loopback (aiosmtpd) that wants a login and keeps every message it is sent."""

    USER, PASSWORD = "hotvm", "s3cret-smtp-pw"

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.messages: list = []
        box = self

        class Handler:
            async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001, N802
                box.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
            ok = auth_data.login == self.USER.encode() and auth_data.password == self.PASSWORD.encode()
            return AuthResult(success=ok)

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port, authenticator=authenticate,
            auth_require_tls=False,
        )  # fmt: skip
        self.controller.start()

    def wait_for(self, *words: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                text = f"Subject: {m['Subject']}\n{m.get_content()}"
                if all(w in text for w in words):
                    return text
            time.sleep(0.5)
        raise AssertionError(f"no mail with {words}; got {[m['Subject'] for m in self.messages]}")


class Room:
    """Two hosts (hv1: web01, hv2: web02, local QEMU VMs), a file target, a webhook and an e-mail
    notification; the server set up by `hotvm prefect setup` and `prefect deploy --all`; one worker per
    host queue plus the fleet worker. Shared by this module's tests (one setup, one set of workers)."""

    def __init__(self, tmp: Path, receiver: Receiver, mailbox: Mailbox) -> None:
        self.tmp, self.receiver, self.mailbox = tmp, receiver, mailbox
        self.target = tmp / "target"
        self.config = tmp / "hotvm.yaml"
        self.vms, self.workers = {}, []


def start_worker(room: Room, queue: str) -> None:
    """`prefect worker start --pool hotvm --work-queue QUEUE` with HOTVM_CONFIG, polling every second."""
    env = {**os.environ, "HOTVM_CONFIG": str(room.config), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(room.tmp / f"worker-{queue}.log", "w")  # noqa: SIM115 - closed with the process
    room.workers.append((subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "hotvm", "--work-queue", queue],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    ), log))  # fmt: skip


@pytest.fixture(scope="module")
def room(prefect_server: str, tmp_path_factory):  # noqa: ANN201
    collections = {ep.value for ep in importlib.metadata.entry_points(group="prefect.collections")}
    assert "flows.email_block" in collections, "hotvm's entry points are not installed: pip install -e ."
    mailbox = Mailbox()
    os.environ["HOTVM_TEST_SMTP_PASSWORD"] = Mailbox.PASSWORD  # read by `hotvm prefect setup` only
    r = Room(tmp_path_factory.mktemp("room"), Receiver(), mailbox)
    try:
        for name in ("web01", "web02"):
            disk = r.tmp / f"{name}.raw"
            with open(disk, "wb") as fh:
                fh.truncate(16 * MiB)
                fh.write(os.urandom(4 * MiB))
            (r.tmp / name).mkdir()
            r.vms[name] = start_qemu(r.tmp / name, [DiskSpec("data", disk, format="raw")])
        launch = r.tmp / "web01" / "launch.sh"  # web01's "VMX": what sync-config registers on its standby
        launch.write_text(
            f"#!/bin/sh\nexec qemu-system-x86_64 -name web01 -accel tcg -M q35 -m 64 -nodefaults "
            f"-display none -nic none -qmp unix:{r.tmp / 'web01' / 'vm.qmp'},server=on,wait=off "
            f"-drive if=none,id=data,file={r.tmp / 'web01.raw'},format=raw "
            "-device virtio-blk-pci,drive=data\n"
        )
        r.config.write_text(yaml.safe_dump({
            "hosts": [
                {"name": "hv1", "vms": [{"name": "web01", "qmp": str(r.vms["web01"].qmp_path),
                                         "config_files": [str(launch)], "standby_host": "hv2"}]},
                {"name": "hv2", "vms": [{"name": "web02", "qmp": str(r.vms["web02"].qmp_path)}],
                 "vm_dir": str(r.tmp / "hv2-vms")},
            ],
            "targets": [{"name": "nas", "url": f"file://{r.target}"}],
            "notifications": [
                {"name": "ops", "webhook": r.receiver.url, "on": ["failed", "crashed", "late"],
                 "late_after": "10s"},
                {"name": "mail", "on": ["failed"], "email": {
                    "smtp": f"127.0.0.1:{mailbox.port}", "from": "hotvm@example.org",
                    "to": ["ops@example.org"], "user": Mailbox.USER,
                    "password_env": "HOTVM_TEST_SMTP_PASSWORD", "security": "none"}},
            ],
        }))  # fmt: skip
        r.setup = json.loads(hotvm("prefect", "setup", "--config", str(r.config), "--json").stdout)
        prefect("deploy", "--all")
        for queue in ("hv1", "hv2", "fleet"):
            start_worker(r, queue)
        yield r
    finally:
        for proc, _ in r.workers:
            proc.terminate()
        for proc, log in r.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        for vm in r.vms.values():
            vm.stop()
        mailbox.controller.stop()
        os.environ.pop("HOTVM_TEST_SMTP_PASSWORD", None)


def children_of(client, parent_id) -> dict:  # noqa: ANN001
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
    )
    return {r.parameters["vm"]: r for r in runs}


def report_of(client, run_id, key: str) -> dict:  # noqa: ANN001
    """The latest version of a run's report table: vm -> row."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    (latest, *_) = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[key])
        ),
        sort=ArtifactSort.CREATED_DESC,
    )
    return {row["vm"]: row for row in json.loads(latest.data)}


def wait_state(client, run_id, done, timeout: float = 60):  # noqa: ANN001, ANN201
    """The run once `done(run)` holds (e.g. a state another process sets after this one's wait)."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if done(run) or time.monotonic() > deadline:
            return run
        time.sleep(1)


def set_ids(target: Path, vm: str) -> list[str]:
    return [m.parent.name for m in manifests(target, vm)]


def test_weekly_image_per_vm_runs_on_host_queues_notify_and_retry(room: Room) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelled, Scheduled

    target, config, receiver = room.target, room.config, room.receiver
    assert room.setup["queues"] == ["hv1", "hv2", "fleet"]
    automations = {r["automation"] for r in room.setup["notifications"]}
    assert automations == {"hotvm-ops-failed-crashed", "hotvm-ops-late", "hotvm-mail-failed"}
    from prefect.client.orchestration import get_client as _client

    with _client(sync_client=True) as client:  # the late rule's description reads like a person wrote it
        (late_rule,) = client.read_automations_by_name("hotvm-ops-late")
        assert "not started 10 s after" in late_rule.description, late_rule.description
    (target / "vms").mkdir(parents=True)
    (target / "vms" / "web02").write_text("blocked")  # web02's set directory cannot be created

    with get_client(sync_client=True) as client:
        mail_block = client.read_block_document_by_name("hotvm-mail", "hotvm-email", include_secrets=False)
        assert Mailbox.PASSWORD not in json.dumps(mail_block.data, default=str)  # masked for the UI/API
        deployments = {d.name: d for d in client.read_deployments()}
        assert deployments["backup-vm"].parameter_openapi_schema["required"] == ["vm"]  # no placeholder
        # a scheduled backup that no worker picks up (its host's worker is down): reported as late
        late = client.create_flow_run_from_deployment(
            deployments["backup-vm"].id, parameters={"vm": "web01"}, work_queue_name="hv-down",
            state=Scheduled(scheduled_time=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)),
        )  # fmt: skip
        parent = client.create_flow_run_from_deployment(deployments["weekly-image"].id)
        parent = wait_final(client, parent.id)
        assert parent.state.is_failed(), parent.state
        assert parent.name.startswith("weekly-image default ")
        children = children_of(client, parent.id)
        assert sorted(children) == ["web01", "web02"]
        for vm, host in (("web01", "hv1"), ("web02", "hv2")):
            child = children[vm]
            assert child.work_queue_name == host  # ran on its host's worker
            assert child.deployment_id == deployments["backup-vm"].id  # retryable from the UI
            assert child.name.startswith(f"backup {vm}@{host} ")
            tags = {"hotvm", f"vm:{vm}", f"host:{host}", "policy:default", "kind:image"}
            assert tags <= set(child.tags)
        assert children["web01"].state.is_completed() and children["web02"].state.is_failed()
        report = report_of(client, parent.id, "backup-policy-default")
        assert report["web01"]["status"] == "success"
        assert report["web01"]["backup_id"] == set_ids(target, "web01")[0]  # the set the child made
        assert (report["web02"]["status"], report["web02"]["step"]) == ("failed", "plan")
        assert "step:plan" in children["web02"].tags
        text = receiver.wait_for("web02", "FAILED")  # posted by the server's automation
        assert "host: hv2" in text and "step: plan" in text, text
        # the same failure by e-mail, sent by the server through hotvm's e-mail block, with the run's link
        mail = room.mailbox.wait_for("backup web02@hv2", "VM: web02")
        assert "host: hv2" in mail and "step: plan" in mail and "error: " in mail, mail
        assert f"/runs/flow-run/{children['web02'].id}" in mail, mail
        assert len(manifests(target, "web01")) == 1

        # the cause removed, the failed child retried on its own: only web02 is backed up
        (target / "vms" / "web02").unlink()
        prefect("flow-run", "retry", str(children["web02"].id))
        assert wait_final(client, children["web02"].id).state.is_completed()
        assert len(manifests(target, "web01")) == 1 and len(manifests(target, "web02")) == 1
        # the retried child's hook: its stale step tag is gone, the parent's report and state tell the truth
        untagged = lambda r: not any(t.startswith("step:") for t in r.tags)  # noqa: E731
        retried = wait_state(client, children["web02"].id, untagged)
        assert not [t for t in retried.tags if t.startswith("step:")], retried.tags
        parent = wait_state(client, parent.id, lambda r: r.state.is_completed())
        assert parent.state.is_completed(), parent.state
        assert "web02" in parent.state.message and children["web02"].name in parent.state.message
        report = report_of(client, parent.id, "backup-policy-default")
        assert report["web02"]["status"] == "success" and report["web02"]["step"] is None
        assert report["web02"]["backup_id"] == set_ids(target, "web02")[0]
        assert report["web01"]["backup_id"] == set_ids(target, "web01")[0]
        node = client.read_task_run(children["web02"].parent_task_run_id)
        assert node.state.is_completed()  # the parent's graph shows web02 green now
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent.id])))
        assert any("this run is Completed now" in entry.message for entry in logs)  # the last line says why

        # a retried parent re-runs only VMs whose last run did not complete: none now
        prefect("flow-run", "retry", str(parent.id))
        assert wait_final(client, parent.id).state.is_completed()
        assert len(manifests(target, "web01")) == 1 and len(manifests(target, "web02")) == 1
        web02 = FlowRunFilter(tags=FlowRunFilterTags(all_=["vm:web02"]))
        tagged = client.read_flow_runs(flow_run_filter=web02)
        assert len([r for r in tagged if r.parent_task_run_id]) == 1  # no second child run for web02

        receiver.wait_for("is late", "web01")
        client.set_flow_run_state(late.id, Cancelled(), force=True)

    out = room.tmp / "restored"
    hotvm("restore", "web02", "--to", str(out), "--format", "raw", "--config", str(config))
    restored = list(out.glob("*data*.raw")) or list(out.glob("*.raw"))
    assert len(restored) == 1
    assert restored[0].read_bytes() == (room.tmp / "web02.raw").read_bytes()


def test_run_from_the_ui_every_deployment_is_on_a_polled_queue_and_backup_vm_hands_off(room: Room) -> None:
    """Run on a per-VM deployment (no queue chosen): the fleet worker takes it and hands the VM's work to
    the VM's host's queue as a linked child; the run ends in the child's state."""
    from prefect.client.orchestration import get_client

    before = set_ids(room.target, "web01")
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments() if d.work_pool_name == "hotvm"}
        polled = {"fleet", "hv1", "hv2"}  # the documented convention: fleet + one queue per host
        unpolled = {n: d.work_queue_name for n, d in deployments.items() if d.work_queue_name not in polled}
        assert unpolled == {}
        run = client.create_flow_run_from_deployment(
            deployments["backup-vm"].id, parameters={"vm": "web01", "config": str(room.config)}
        )
        run = wait_final(client, run.id)
        assert run.work_queue_name == "fleet" and run.state.is_completed(), run.state
        assert run.name.startswith("backup web01@hv1 ")
        (child,) = children_of(client, run.id).values()
        assert child.work_queue_name == "hv1" and child.state.is_completed()  # on web01's host's worker
        assert child.deployment_id == deployments["backup-vm"].id
        assert f"done by '{child.name}' on work queue hv1" in run.state.message
        (new_set,) = set(set_ids(room.target, "web01")) - set(before)
        assert new_set in run.state.message


def test_scheduled_fleet_runs_without_their_config_section_complete_and_say_what_to_add(room: Room) -> None:
    """offsite-copy, weekly-tape, sync-config and daily-files with nothing configured for them (what
    `deploy --all` schedules right after setup): Completed, readable names, one line and one artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    bare = yaml.safe_load(room.config.read_text())
    for host in bare["hosts"]:
        for vm in host["vms"]:
            vm.pop("standby_host", None)
    bare["policies"] = [{"name": "default"}]  # a policy without files: (the implicit default has them)
    bare_config = room.tmp / "bare.yaml"  # no offsite target, no tapes, no standby, no files: policy
    bare_config.write_text(yaml.safe_dump(bare))
    expected = {
        "offsite-copy": "a target named 'offsite'",
        "weekly-tape": "a tape named 'vtl' (tapes:)",
        "sync-config": "standby_host: HOST to a VM",
        "daily-files": "a files: section to policy 'default'",
    }
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        runs = {
            name: client.create_flow_run_from_deployment(
                deployments[name].id, parameters={"config": str(bare_config)}
            )
            for name in expected
        }
        for name, add in expected.items():
            run = wait_final(client, runs[name].id)
            assert run.state.is_completed(), (name, run.state)
            day = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}"
            assert run.name.startswith(f"{name} ") and run.name.endswith(day), run.name
            assert run.state.message.startswith(f"nothing configured: add {add}"), run.state.message
            assert run.state.message.endswith(" to hotvm.yaml")
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            assert [a.key for a in artifacts] == [f"{name}-nothing-configured"], name
            assert add in artifacts[0].data


def test_sync_config_registers_each_vm_on_its_standby_host_queue(room: Room) -> None:
    """sync-config from its deployment: one sync-vm run on the standby host's queue (hv2) registers
    web01's latest backed-up config there, as the report says."""
    from prefect.client.orchestration import get_client

    if not manifests(room.target, "web01"):  # alone (-k) this test makes its own backup
        hotvm("backup", "web01", "--config", str(room.config))
    latest = set_ids(room.target, "web01")[-1]
    spec = room.tmp / "hv2-vms" / "web01" / "hotvm-vm.json"
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        parent = client.create_flow_run_from_deployment(
            deployments["sync-config"].id, parameters={"config": str(room.config)}
        )
        parent = wait_final(client, parent.id)
        assert parent.state.is_completed(), parent.state
        assert parent.name.startswith("sync-config ")
        (child,) = children_of(client, parent.id).values()
        assert child.parameters["vm"] == "web01" and child.state.is_completed(), child.state
        assert child.work_queue_name == "hv2" and child.deployment_id == deployments["sync-vm"].id
        assert {"hotvm", "kind:standby", "vm:web01", "host:hv2"} <= set(child.tags)
        assert child.state.message == f"standby on hv2 created from backup {latest}"
        row = report_of(client, parent.id, "sync-config-all")["web01"]
        assert (row["status"], row["host"], row["backup_id"]) == ("success", "hv2", latest)
    registered = json.loads(spec.read_text())  # registered on the standby, powered off
    assert registered["new_identity"] is False
    assert str(room.tmp / "web01.raw") in registered["disks"].values()  # shared storage: the VM's disk
    assert (room.tmp / "hv2-vms" / "web01" / "launch.sh").exists()


def test_verify_runs_one_verify_vm_per_vm_on_its_host_queue(room: Room) -> None:
    from prefect.client.orchestration import get_client

    for vm in ("web01", "web02"):  # alone (-k) this test makes its own backups
        if not manifests(room.target, vm):
            hotvm("backup", vm, "--config", str(room.config))
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        schema = deployments["verify-vm"].parameter_openapi_schema
        assert schema["required"] == ["vm"] and schema["properties"]["vm"]["description"]
        parent = client.create_flow_run_from_deployment(
            deployments["verify"].id, parameters={"boot": False, "config": str(room.config)}
        )
        parent = wait_final(client, parent.id)
        assert parent.state.is_completed(), parent.state
        children = children_of(client, parent.id)
        assert sorted(children) == ["web01", "web02"]
        for vm, host in (("web01", "hv1"), ("web02", "hv2")):
            child = children[vm]
            assert child.state.is_completed(), child.state
            assert child.work_queue_name == host and child.deployment_id == deployments["verify-vm"].id
            assert child.name.startswith(f"verify {vm}@{host} ")
            assert {"hotvm", "kind:verify", f"vm:{vm}", f"host:{host}"} <= set(child.tags)
            assert child.state.message.startswith("verified ")
    for vm in ("web01", "web02"):  # each set's restore-test record says verified
        records = list((room.target / "vms" / vm).glob("*/restore-tests/*.json"))
        assert records, f"no restore-test record for {vm}"


def test_recover_runs_one_recover_vm_per_vm_on_its_host_queue(room: Room) -> None:
    from prefect.client.orchestration import get_client

    for vm in ("web01", "web02"):  # alone (-k) this test makes its own backups
        if not manifests(room.target, vm):
            hotvm("backup", vm, "--config", str(room.config))
    dr = room.tmp / "dr"
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert {"tier", "to"} <= set(deployments["recover"].parameter_openapi_schema["required"])
        parent = client.create_flow_run_from_deployment(
            deployments["recover"].id,
            parameters={"tier": 3, "to": str(dr), "fmt": "raw", "config": str(room.config)},  # the default
        )  # policy's tier
        parent = wait_final(client, parent.id)
        assert parent.state.is_completed(), parent.state
        assert parent.name.startswith("recover 3 ")
        children = children_of(client, parent.id)
        for vm, host in (("web01", "hv1"), ("web02", "hv2")):
            child = children[vm]
            assert child.state.is_completed(), child.state
            assert child.work_queue_name == host and child.deployment_id == deployments["recover-vm"].id
            assert child.name.startswith(f"recover {vm}@{host} ") and "tier:3" in child.tags
            (disk,) = (dr / vm).glob("*.raw")  # restored on its host's worker, byte-identical
            assert disk.read_bytes() == (room.tmp / f"{vm}.raw").read_bytes()


def test_notifications_config_parses_yaml_on_and_refuses_bad_entries(tmp_path: Path) -> None:
    from hotvm.config_file import load_config, parse_config
    from hotvm.errors import ConfigError
    from hotvm.notifications import automation_specs, email_settings, webhook_url

    base = {"hosts": [{"name": "hv1", "vms": [{"name": "web01", "qmp": "/nonexistent"}]}],
            "targets": [{"name": "nas", "url": f"file://{tmp_path}"}]}  # fmt: skip
    path = tmp_path / "hotvm.yaml"
    path.write_text(yaml.safe_dump(base) + "notifications:\n  - name: ops\n    webhook_env: OPS_HOOK\n"
                    "    on: [failed, late]\n    late_after: 30m\n")  # fmt: skip
    (ops,) = load_config(path).notifications  # YAML 1.1 reads `on:` as true: still the `on` list
    assert ops.on == ["failed", "late"] and ops.late_after.total_seconds() == 1800
    specs = {s["name"]: s for s in automation_specs(ops)}
    assert specs["hotvm-ops-failed"]["trigger"]["expect"] == ["prefect.flow-run.Failed"]
    assert specs["hotvm-ops-late"]["trigger"]["within"] == 1800
    assert "not started 30 min after they were due" in specs["hotvm-ops-late"]["description"]
    with pytest.raises(ConfigError, match="OPS_HOOK"):
        webhook_url(ops)  # not set in the environment: one line naming the variable
    mail = {"name": "mail", "email": {"smtp": "mail.example.org:587", "from": "hotvm@example.org",
                                      "to": ["ops@example.org"], "user": "u", "password_env": "PW_X"}}
    (n,) = parse_config({**base, "notifications": [mail]}).notifications
    with pytest.raises(ConfigError, match="PW_X"):
        email_settings(n)  # the password's variable is not set: one line naming it
    os.environ["PW_X"] = "pw"
    try:
        settings = email_settings(n)
    finally:
        del os.environ["PW_X"]
    assert (settings["smtp_host"], settings["smtp_port"], settings["security"]) == ("mail.example.org", 587,
                                                                                     "starttls")
    for bad, message in (
        ({"name": "ops"}, "exactly one of webhook, webhook_env, email"),
        ({"name": "ops", "webhook": "ftp://x"}, "http"),
        ({"name": "ops", "webhook": "https://u:secret@x/h"}, "password"),
        ({"name": "ops", "webhook": "https://x/h", "late_after": "5s"}, "at least 10s"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "notifications": [bad]})
