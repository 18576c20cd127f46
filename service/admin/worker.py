"""Run one stored conversion job in this process:
`python -m service.admin.worker --store DIR [--nice N] [--threads N] [--pin] JOB_ID`.

The service starts this in a separate worker process (service/admin/supervisor.py), so a crash or an
out-of-memory in a conversion never takes the server down. Everything the job says goes through the
store's job row: progress and stage while it runs, then exactly one terminal status with the error or
the result. Cancellation is cooperative: the row's `cancel_requested` flag is polled and turned into
the cancel event that every loop of the conversion checks. How much the worker yields to serving (niceness,
threads, pinning) comes on its command line from the supervisor, which reads it from the server's settings.

The worker dies with its server (issue 17, M3): it runs in its own process group, so nothing the kernel
does to the server's group reaches it, and a server killed with -9 cannot stop it either. So a watchdog
thread waits for the server (`--parent-pid`) to be gone: started by the server, it compares its parent pid
with the server's every PARENT_POLL_S; forked by the fork server (service/runner/forkserver.py), whose child it
is, it waits on the server's pidfd ($EAS_SERVER_PIDFD). Then it records the job failed, kills its own process
group and exits. (PR_SET_PDEATHSIG would not do:
it fires when the *thread* that spawned the worker ends, and the supervisor's thread ends before a clean
shutdown sends its SIGTERM.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from pydantic import ValidationError

from eas.conversion.data import DatasetError
from eas.conversion.errors import Cancelled, ConversionFailed
from eas.conversion.job import build_request
from eas.conversion.pipeline import ProgressEvent, convert
from model_store import ModelStore
from model_store.errors import StoreError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
CANCEL_POLL_S = 0.5
PARENT_POLL_S = 0.25
ORPHANED = "failed: the server that ran the job stopped (its worker exits with it)"


def yield_to_serving(nice: int, threads: int, pin: bool) -> tuple[int, int]:
    """Lower this worker's priority by `nice` and, with `threads` > 0, run that many torch threads, pinned to
    the last cores with `pin`, so a conversion slows serving as little as possible (the server shrinks its
    own threads by as many while the job runs, service/runner/threads.py). Returns (niceness, torch threads)."""
    import torch

    niceness = os.nice(nice)
    if threads > 0:
        cpus = sorted(os.sched_getaffinity(0))
        if pin and threads < len(cpus):
            os.sched_setaffinity(0, cpus[-threads:])  # off the cores the server's threads wake on first
        torch.set_num_threads(threads)
    return niceness, torch.get_num_threads()


class _ProgressWriter:
    """Writes progress to the job row at most every PROGRESS_INTERVAL_S (SQLite writes are not free)."""

    def __init__(self, store: ModelStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self._last = 0.0
        self._stage = ""

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.stage == self._stage and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last, self._stage = now, event.stage
        stage = f"{event.stage}: {event.message}"[:500]
        self.store.jobs.update(self.job_id, progress=round(event.fraction, 4), stage=stage)


def _watch_cancel(store: ModelStore, job_id: str, cancel: threading.Event, done: threading.Event) -> None:
    while not done.wait(CANCEL_POLL_S):
        try:
            if store.jobs.get(job_id).cancel_requested:
                cancel.set()
                return
        except StoreError:
            log.exception("cannot read job %s", job_id)


def _watch_parent(store_root: Path, job_id: str, parent_pid: int, server_pidfd: int | None = None) -> None:
    """Exit as soon as the server is gone: its pidfd is readable, or (without one) its pid is no longer our
    parent (we were re-parented)."""
    if server_pidfd is not None:
        select.select([server_pidfd], [], [])
    while server_pidfd is None and os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    try:
        job = ModelStore(store_root).jobs.get(job_id)
        if not job.finished:
            ModelStore(store_root).jobs.update(job_id, status="failed", error=ORPHANED)
    except Exception:  # the store may be locked or gone: exiting matters more than the record
        log.exception("cannot record job %s as failed", job_id)
    finally:
        with contextlib.suppress(OSError):
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the whole group, anything the conversion started too
        os._exit(1)


def start_parent_watchdog(store_root: Path, job_id: str, parent_pid: int | None) -> None:
    if parent_pid is None:
        return
    pidfd = os.environ.pop("EAS_SERVER_PIDFD", None)  # forked by the fork server: not the server's child
    server_pidfd = int(pidfd) if pidfd else None
    if server_pidfd is None and os.getppid() != parent_pid:  # the server died before we got here
        _watch_parent(store_root, job_id, parent_pid)
    threading.Thread(target=_watch_parent, args=(store_root, job_id, parent_pid, server_pidfd),
                     name="parent-watchdog", daemon=True).start()


def run_job(store_root: Path, job_id: str) -> str:
    """Run the job to a terminal status and return it."""
    store = ModelStore(store_root)
    job = store.jobs.get(job_id)
    cancel, done = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(store, job_id, cancel, done), daemon=True)
    watcher.start()
    try:
        request = build_request(store_root, {**job.params, "model": job.model, "version": job.source_version})
        result = convert(request, progress=_ProgressWriter(store, job_id), cancel=cancel, open_store=ModelStore)
        # The compact facts; the full record (training curve, cost model, ...) is conversion.json in the version.
        summary = {**result.summary(), "plan": result.plan.model_dump(mode="json")}
        store.jobs.update(job_id, status="succeeded", progress=1.0, stage="done", result=summary)
        return "succeeded"
    except Cancelled as exc:
        store.jobs.update(job_id, status="cancelled", stage="cancelled", error=str(exc))
        return "cancelled"
    except (ConversionFailed, DatasetError, StoreError, ValidationError, ValueError) as exc:
        store.jobs.update(job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        return "failed"
    except Exception as exc:  # an unexpected bug: record it, keep the traceback in the worker log
        traceback.print_exc()
        store.jobs.update(job_id, status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        return "failed"
    finally:
        done.set()


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="the server's pid: exit (recording the job failed) once it is gone")
    parser.add_argument("--nice", type=_non_negative, default=0, help="lower this process's priority by N")
    parser.add_argument("--threads", type=_non_negative, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                        help="pin to the last --threads cores")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start_parent_watchdog(args.store, args.job_id, args.parent_pid)
    niceness, threads = yield_to_serving(args.nice, args.threads, args.pin)
    log.info("job %s: niceness %d, %d torch threads", args.job_id, niceness, threads)
    status = run_job(args.store, args.job_id)
    return 0 if status in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
