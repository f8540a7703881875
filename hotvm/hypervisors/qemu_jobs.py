"""Waiting for QEMU block jobs by polling, and 'answering the question' when one stops on an I/O error.

Jobs are started with auto-dismiss off, so QEMU keeps their final status until we dismiss them: polling
`query-jobs` therefore survives a dropped connection (and a new driver can pick a job up), which waiting
for an event would not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from hotvm.errors import BlockJobError
from hotvm.hypervisors.qmp import Monitor, QmpCommandError

log = logging.getLogger("hotvm.qemu")

MAX_RESUMES = 3
CANCEL_WAIT_S = 60.0
FINISHED = {"concluded", "null"}


@dataclass
class JobOutcome:
    status: str
    error: str | None
    finished_at: float
    """perf_counter() when the job was first seen concluded (for the pivot stall)."""


class JobWatcher:
    """Polls one job until a wanted state, applying the host's timeout and I/O-error policy."""

    def __init__(
        self, mon: Monitor, vm: str, device: str, job_id: str, timeout_s: float, on_io_error: str
    ) -> None:
        self.mon, self.vm, self.device, self.job_id = mon, vm, device, job_id
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.on_io_error = on_io_error
        self.resumes = 0

    def job(self) -> dict | None:
        for job in self.mon.cmd("query-jobs", retry=True):
            if job["id"] == self.job_id:
                return job
        return None

    def _block_job(self) -> dict:
        for job in self.mon.cmd("query-block-jobs", retry=True):
            if job.get("device") == self.job_id:
                return job
        return {}

    def wait(
        self, until: set[str], interval: float = 0.02, on_tick: Callable[[], None] | None = None
    ) -> JobOutcome:
        """Poll until the job's status is in `until` (or it finished); raise BlockJobError on failure."""
        while True:
            job = self.job()
            now = time.perf_counter()
            if job is None:
                raise BlockJobError(
                    f"VM '{self.vm}', disk {self.device}: block job {self.job_id} disappeared",
                    "something else dismissed it; run the backup again (it reconciles first)",
                )
            status = job["status"]
            if status in until or status in FINISHED:
                return JobOutcome(status, job.get("error"), now)
            if status == "paused":
                self._answer_paused_job()
            else:
                self._answer_vm_io_error()
            if on_tick:
                on_tick()
            if time.monotonic() > self.deadline:
                self.cancel()
                raise BlockJobError(
                    f"VM '{self.vm}', disk {self.device}: block job {self.job_id} did not finish within "
                    f"{self.timeout_s:g}s; it was cancelled",
                    "raise job_timeout_s for this host or look for slow storage; the disk is still on its "
                    "overlay, the next run reconciles it",
                )
            time.sleep(interval)

    # ------------------------------------------------------------------ the question

    def _answer_paused_job(self) -> None:
        io_status = self._block_job().get("io-status", "ok")
        if io_status == "ok":
            return  # paused by someone else (or transiently): not ours to decide
        self._decide(f"block job {self.job_id} paused on an I/O error (io-status {io_status})", "job-resume")

    def _answer_vm_io_error(self) -> None:
        status = self.mon.cmd("query-status", retry=True)
        if status.get("status") != "io-error":
            return
        self._decide("the VM stopped on a guest I/O error (runstate io-error)", "cont")

    def _decide(self, what: str, resume_cmd: str) -> None:
        where = f"VM '{self.vm}', disk {self.device}"
        if self.on_io_error == "resume" and self.resumes < MAX_RESUMES:
            self.resumes += 1
            log.warning(
                "%s: %s; on_io_error=resume: %s (%d/%d)", where, what, resume_cmd, self.resumes, MAX_RESUMES
            )
            if resume_cmd == "job-resume":
                self.mon.cmd("job-resume", {"id": self.job_id})
            else:
                self.mon.cmd("cont")
            return
        reason = (
            "on_io_error=cancel"
            if self.on_io_error == "cancel"
            else f"still failing after {MAX_RESUMES} resumes"
        )
        log.error("%s: %s; %s: cancelling job %s", where, what, reason, self.job_id)
        self.cancel()
        raise BlockJobError(
            f"{where}: {what}; the commit was cancelled ({reason})",
            "check the storage of the disk image and its overlay (space, permissions, dmesg); the disk stays "
            "on its hotvm overlay until a later run reconciles it"
            + ("; the VM is paused: 'cont' it once the storage is fixed" if resume_cmd == "cont" else ""),
        )

    # ------------------------------------------------------------------ ending

    def cancel(self) -> None:
        """Cancel, wait for the job to conclude and dismiss it; best effort (we are already failing)."""
        try:
            self.mon.cmd("job-cancel", {"id": self.job_id})
        except QmpCommandError as exc:
            log.warning("job-cancel %s: %s", self.job_id, exc)
        end = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < end:
            job = self.job()
            if job is None:
                return
            if job["status"] in FINISHED:
                self.dismiss()
                return
            time.sleep(0.05)
        log.error("job %s did not conclude %gs after cancel", self.job_id, CANCEL_WAIT_S)

    def dismiss(self) -> None:
        try:
            self.mon.cmd("job-dismiss", {"id": self.job_id})
        except QmpCommandError as exc:
            log.debug("job-dismiss %s: %s", self.job_id, exc)
