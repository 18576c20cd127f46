"""Start, watch and stop conversion worker processes.

A conversion runs as `python -m service.admin.worker` in its own process group, so an exception, an
out-of-memory kill or a segfault in it never reaches the server. The supervisor thread starts queued jobs
(one at a time by default: a conversion already uses every core), reaps finished workers, and turns a
worker that died without recording a terminal status into a failed job that says how it died. A cancel
is cooperative (the worker polls its row); a worker that ignores it past a grace period is killed.

`on_finished` (metrics) hears of every job this supervisor sees reach a terminal status — reaped, killed
after a cancel, cancelled while queued, failed at start-up or at shutdown — exactly once per job. A job
that succeeded and asked for `activate` is handed to `activate` (hot activation in the server); the worker
itself never flips the active version (eas/conversion/job.py SERVER_FIELDS). What became of it is written to
the job's row (`activation`: pending → done | failed, with `activation_error`), by this thread: `activate`
may return a Future, which the loop polls, so no SQLite write ever runs on the server's event loop.

A worker must not outlive its server (issue 17, M3): it runs in its own process group (so a Ctrl-C to the
server does not reach it) and watches the server, ending when it is gone (service/admin/worker.py). It is
forked by the fork server, which has done the imports (Settings.forkserver, service/runner/forkserver.py), or
else started afresh.

How much a worker yields to serving (Settings.job_nice, job_threads, job_pin) goes on its command line.
Finished jobs older than Settings.job_ttl_s are deleted at start and then every min(ttl, 60 s), with
their logs; queued and running jobs never are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from model_store import JobRecord, ModelStore
from model_store.errors import StoreError
from service.admin.requests import ACTIVATE
from service.runner.forkserver import ForkedProcess, fork_module
from service.runner.threads import job_thread_count
from service.settings import Settings

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_MAX_S = 60.0  # how stale an expired job may linger at most, beyond its ttl


@dataclass
class _Worker:
    job_id: str
    process: subprocess.Popen | ForkedProcess
    log_path: Path
    cancel_seen_at: float | None = None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"worker process was killed by {name}"
    return f"worker process exited with code {returncode} without recording a result"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class JobSupervisor:
    def __init__(
        self,
        store: ModelStore,
        settings: Settings | None = None,
        *,
        activate: Callable[[str, str], object] | None = None,
        on_finished: Callable[[JobRecord], None] | None = None,
        on_workers_changed: Callable[[int], None] | None = None,
        max_concurrent: int = 1,
        poll_s: float = 0.2,
        cancel_grace_s: float = 15.0,
        python: str = sys.executable,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.store = store
        self.settings = settings or Settings()
        self.activate = activate  # (model, version) of a succeeded job that asked for it; supervisor thread
        self.on_finished = on_finished
        self.on_workers_changed = on_workers_changed  # the server lowers its CPU threads while jobs run
        self._reported: set[str] = set()  # job ids already passed to on_finished
        self.max_concurrent = max_concurrent
        self.poll_s = poll_s
        self.cancel_grace_s = cancel_grace_s
        self.python = python
        self.clock = clock  # what "now" is for expiry (tests move it)
        self.expiry_interval_s = min(EXPIRY_INTERVAL_MAX_S, self.settings.job_ttl_s)
        self._next_expiry = 0.0
        self.log_dir = Path(store.root) / "job-logs"
        self._workers: dict[str, _Worker] = {}
        self._activations: dict[str, Future] = {}  # job id -> activation under way in the server
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Fail the jobs a previous server left unfinished, expire old finished ones, then start
        supervising; returns the ids of the failed ones."""
        interrupted = self.store.jobs.fail_interrupted("interrupted: the server restarted while the job ran")
        self.store.jobs.fail_pending_activations("the server stopped before activating the new version")
        for job_id in interrupted:
            self._report_finished(self.store.jobs.get(job_id))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.expire_finished()
        self._thread = threading.Thread(target=self._loop, name="job-supervisor", daemon=True)
        self._thread.start()
        return interrupted

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop supervising; running workers get SIGTERM, then SIGKILL, and their jobs fail with `shutdown`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        self._workers_changed()
        for worker in workers:
            _signal_group(worker.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(worker.process, signal.SIGKILL)
                worker.process.wait()
            job = self._fail_if_unfinished(worker.job_id, "shutdown: the server stopped while the job ran")
            if job is not None:
                self._report_finished(job)

    # -- API used by the routes --------------------------------------------------------------------------
    def submit(self) -> None:
        """A job was queued: look for work now rather than at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> JobRecord:
        was_queued = self.store.jobs.get(job_id).status == "queued"
        job = self.store.jobs.request_cancel(job_id)
        if was_queued and job.finished:  # cancelled before any worker ran it: nobody else will report it
            self._report_finished(job)
        self._wake.set()
        return job

    def running_pids(self) -> dict[str, int]:
        with self._lock:
            return {job_id: w.process.pid for job_id, w in self._workers.items()}

    def expire_finished(self) -> list[str]:
        """Delete the finished jobs that finished more than Settings.job_ttl_s ago, and their logs; returns
        their ids. Queued and running jobs are never expired."""
        self._next_expiry = time.monotonic() + self.expiry_interval_s
        expired = self.store.jobs.cleanup(timedelta(seconds=self.settings.job_ttl_s), now=self.clock())
        for job_id in expired:
            (self.log_dir / f"{job_id}.log").unlink(missing_ok=True)
        if expired:
            log.info("expired %d finished job(s) older than %.0f s", len(expired), self.settings.job_ttl_s)
        return expired

    # -- the loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._record_activations()
                self._start_queued()
                if time.monotonic() >= self._next_expiry:
                    self.expire_finished()
            except Exception:  # the supervisor must outlive any single bad row or failed spawn
                log.exception("job supervisor iteration failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _start_queued(self) -> None:
        with self._lock:
            free = self.max_concurrent - len(self._workers)
        if free <= 0 or self._stop.is_set():
            return
        queued = self.store.jobs.select(status="queued", limit=1000)
        for job in sorted(queued, key=lambda j: j.created_at)[:free]:
            self._spawn(job)

    def worker_command(self, job_id: str) -> list[str]:
        """The worker's command line: how much it yields to serving comes from the settings, explicitly."""
        settings = self.settings
        return [self.python, "-m", "service.admin.worker", "--store", str(self.store.root),
                "--parent-pid", str(os.getpid()),
                "--nice", str(settings.job_nice), "--threads", str(job_thread_count(settings.job_threads)),
                "--pin" if settings.job_pin else "--no-pin", job_id]

    def _spawn(self, job: JobRecord) -> None:
        log_path = self.log_dir / f"{job.id}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        command = self.worker_command(job.id)
        with log_path.open("ab") as log_file:
            process: subprocess.Popen | ForkedProcess | None = None
            if self.settings.forkserver and command[:2] == [sys.executable, "-m"]:
                # Forked by the fork server, which has done the imports (service/runner/forkserver.py).
                process = fork_module(command[2], command[3:], environ=env, output_fd=log_file.fileno())
            if process is None:
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # its own process group: signals to the server don't reach it
                )
        try:
            self.store.jobs.update(job.id, status="running", stage="starting", worker_pid=process.pid)
        except StoreError:  # cancelled between listing and spawning: stop the worker we just started
            _signal_group(process, signal.SIGKILL)
            process.wait()
            return
        with self._lock:
            self._workers[job.id] = _Worker(job.id, process, log_path)
        self._workers_changed()
        log.info("job %s started in worker pid %d", job.id, process.pid)

    def _workers_changed(self) -> None:
        if self.on_workers_changed is not None:
            with self._lock:
                running = len(self._workers)
            self.on_workers_changed(running)

    def _reap(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            returncode = worker.process.poll()
            if returncode is None:
                self._enforce_cancel(worker)
                continue
            with self._lock:
                self._workers.pop(worker.job_id, None)
            self._workers_changed()
            job = self._fail_if_unfinished(worker.job_id, describe_exit(returncode))
            log.info("job %s worker exited (%s): %s", worker.job_id, returncode, job.status if job else "?")
            if job is not None:
                self._report_finished(job)
            if job is not None:
                self._activate_if_asked(job)

    def _activate_if_asked(self, job: JobRecord) -> None:
        """The one place a job's `activate` is acted on: after it succeeded, by the server."""
        version = (job.result or {}).get("version")
        if job.status != "succeeded" or not job.params.get(ACTIVATE):
            return
        if not version or self.activate is None:
            self._set_activation(job.id, "failed", "no version to activate" if not version
                                 else "this server does not activate versions")
            return
        try:
            pending = self.activate(job.model, version)
        except Exception as exc:  # the job succeeded all the same; the version can be activated by hand
            log.exception("hot activation of %s:%s after job %s failed", job.model, version, job.id)
            self._set_activation(job.id, "failed", _reason(exc))
            return
        if isinstance(pending, Future):
            self._activations[job.id] = pending  # recorded by _record_activations when it ends
        else:
            self._set_activation(job.id, "done")

    def _record_activations(self) -> None:
        for job_id, pending in list(self._activations.items()):
            if not pending.done():
                continue
            del self._activations[job_id]
            error = pending.exception() if not pending.cancelled() else RuntimeError("activation was cancelled")
            self._set_activation(job_id, "failed" if error else "done", _reason(error) if error else None)

    def _set_activation(self, job_id: str, state: str, error: str | None = None) -> None:
        try:
            self.store.jobs.set_activation(job_id, state, error)  # type: ignore[arg-type]
        except StoreError:
            log.exception("cannot record the activation outcome of job %s", job_id)

    def _enforce_cancel(self, worker: _Worker) -> None:
        job = self.store.jobs.get(worker.job_id)
        if not job.cancel_requested:
            return
        now = time.monotonic()
        if worker.cancel_seen_at is None:
            worker.cancel_seen_at = now
        elif now - worker.cancel_seen_at > self.cancel_grace_s:
            log.warning("job %s ignored its cancel for %.0f s: killing the worker", job.id, self.cancel_grace_s)
            _signal_group(worker.process, signal.SIGKILL)
            worker.process.wait()
            with self._lock:
                self._workers.pop(worker.job_id, None)
            self._workers_changed()
            if not self.store.jobs.get(job.id).finished:
                self.store.jobs.update(job.id, status="cancelled", error="cancelled: the worker was stopped")
            self._report_finished(self.store.jobs.get(job.id))

    def _report_finished(self, job: JobRecord) -> None:
        if self.on_finished is None or not job.finished:
            return
        with self._lock:
            if job.id in self._reported:
                return
            self._reported.add(job.id)
        try:
            self.on_finished(job)
        except Exception:  # an observer must never stop supervision
            log.exception("finish hook of job %s failed", job.id)

    def _fail_if_unfinished(self, job_id: str, reason: str) -> JobRecord | None:
        try:
            job = self.store.jobs.get(job_id)
            if not job.finished:
                job = self.store.jobs.update(job_id, status="failed", error=reason)
            return job
        except StoreError:
            log.exception("cannot record the end of job %s", job_id)
            return None


def _reason(exc: BaseException) -> str:
    """A short, public reason: the exception's message, never a traceback or an object repr."""
    return (str(exc) or type(exc).__name__)[:500]


def _signal_group(process: subprocess.Popen | ForkedProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, sig)
