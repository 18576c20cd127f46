"""Run one stored conversion job in this process: `python -m eas.conversion.job --store DIR JOB_ID`.

The service starts this in a separate worker process (service/admin/supervisor.py), so a crash or an
out-of-memory in a conversion never takes the server down. Everything the job says goes through the
store's job row: progress and stage while it runs, then exactly one terminal status with the error or
the result. Cancellation is cooperative: the row's `cancel_requested` flag is polled and turned into
the cancel event that every loop of the conversion checks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from eas.conversion.data import DatasetError
from eas.conversion.errors import Cancelled, ConversionFailed
from eas.conversion.pipeline import ConversionRequest, ProgressEvent, convert
from model_store import ModelStore
from model_store.errors import StoreError

log = logging.getLogger(__name__)

# Fields of ConversionRequest that the server decides, never the job's submitter. `activate` is the
# server's too: it loads and warms the new version and only then marks it active (hot activation), so the
# store never names as active a version the server has not shown it can serve.
SERVER_FIELDS = frozenset({"store", "out", "show_progress_bar", "activate"})
PROGRESS_INTERVAL_S = 0.5
CANCEL_POLL_S = 0.5


def yield_to_serving() -> tuple[int, int]:
    """Lower this worker's priority and keep it on its own cores, so a conversion slows serving as
    little as possible: EAS_JOB_NICE (default 10), EAS_JOB_THREADS (default: all cores but one; the server
    shrinks its own threads by as many while the job runs, service/runner/threads.py) and EAS_JOB_PIN
    (default 1: pin to the last cores). Returns (niceness, torch threads)."""
    import torch

    nice = int(os.environ.get("EAS_JOB_NICE", "10"))
    threads = int(os.environ.get("EAS_JOB_THREADS", "0")) or max(1, len(os.sched_getaffinity(0)) - 1)
    niceness = os.nice(nice) if nice > 0 else os.nice(0)
    cpus = sorted(os.sched_getaffinity(0))
    if os.environ.get("EAS_JOB_PIN", "1") == "1" and threads < len(cpus):
        os.sched_setaffinity(0, cpus[-threads:])  # keep the job off the cores the server's threads wake on first
    torch.set_num_threads(threads)
    return niceness, threads


def build_request(
    store_root: Path, model: str, source_version: str | None, params: dict[str, Any]
) -> ConversionRequest:
    """The ConversionRequest of a job; raises pydantic's ValidationError for bad parameters."""
    fields = {k: v for k, v in params.items() if k not in SERVER_FIELDS | {"model", "version"}}
    return ConversionRequest(store=store_root, model=model, version=source_version, show_progress_bar=False, **fields)


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
        self.store.update_job(self.job_id, progress=round(event.fraction, 4), stage=stage)


def _watch_cancel(store: ModelStore, job_id: str, cancel: threading.Event, done: threading.Event) -> None:
    while not done.wait(CANCEL_POLL_S):
        try:
            if store.get_job(job_id).cancel_requested:
                cancel.set()
                return
        except StoreError:
            log.exception("cannot read job %s", job_id)


def run_job(store_root: Path, job_id: str) -> str:
    """Run the job to a terminal status and return it."""
    store = ModelStore(store_root)
    job = store.get_job(job_id)
    cancel, done = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(store, job_id, cancel, done), daemon=True)
    watcher.start()
    try:
        request = build_request(store_root, job.model, job.source_version, job.params)
        result = convert(request, progress=_ProgressWriter(store, job_id), cancel=cancel)
        # The compact facts; the full record (training curve, cost model, ...) is conversion.json in the version.
        summary = {**result.summary(), "plan": result.plan.model_dump(mode="json")}
        store.update_job(job_id, status="succeeded", progress=1.0, stage="done", result=summary)
        return "succeeded"
    except Cancelled as exc:
        store.update_job(job_id, status="cancelled", stage="cancelled", error=str(exc))
        return "cancelled"
    except (ConversionFailed, DatasetError, StoreError, ValidationError, ValueError) as exc:
        store.update_job(job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        return "failed"
    except Exception as exc:  # an unexpected bug: record it, keep the traceback in the worker log
        traceback.print_exc()
        store.update_job(job_id, status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        return "failed"
    finally:
        done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    niceness, threads = yield_to_serving()
    log.info("job %s: niceness %d, %d torch threads", args.job_id, niceness, threads)
    status = run_job(args.store, args.job_id)
    return 0 if status in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
