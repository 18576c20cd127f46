"""Conversion-job metrics: the supervisor reports every job's final status exactly once (through the
callback the app passes in), durations come from the job's timestamps, and the in-progress gauge reads
the supervisor's running workers."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from model_store import JobRecord, ModelStore
from service.admin.supervisor import JobSupervisor
from tests.observability.conftest import value
from tests.service.conftest import ModelDirs, make_settings, running_app


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


def fake_python(tmp_path: Path, body: str) -> str:
    """An 'interpreter' for the worker command line that never runs Python: keeps these tests cheap."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_each_final_status_is_reported_once(store_with_model: ModelStore, tmp_path: Path) -> None:
    store = store_with_model
    finished: list[JobRecord] = []
    running: list[int] = []
    # A worker that runs for a moment and dies without recording a result: the supervisor fails the job.
    supervisor = JobSupervisor(store, on_finished=finished.append, poll_s=0.05,
                               python=fake_python(tmp_path, "sleep 0.5; exit 3"))
    supervisor.start()
    try:
        job = store.jobs.create("tiny", "v1", {"criterion": "uniform"})
        supervisor.submit()
        wait_for(lambda: bool(supervisor.running_pids()) or bool(finished))
        running.append(len(supervisor.running_pids()))
        wait_for(lambda: len(finished) == 1)
        assert finished[0].id == job.id and finished[0].status == "failed"
        assert finished[0].started_at is not None and finished[0].finished_at is not None
        assert "exited with code 3" in (finished[0].error or "")
        assert supervisor.running_pids() == {}
        # Cancelling a finished job again changes nothing and reports nothing.
        supervisor.cancel(job.id)
        time.sleep(0.2)
        assert len(finished) == 1
    finally:
        supervisor.shutdown(5)
    assert running == [1]


def test_queued_cancel_is_reported_once(store_with_model: ModelStore) -> None:
    store = store_with_model
    finished: list[JobRecord] = []
    supervisor = JobSupervisor(store, on_finished=finished.append, max_concurrent=0)  # never starts workers
    supervisor.start()
    try:
        job = store.jobs.create("tiny", "v1", {"criterion": "uniform"})
        supervisor.cancel(job.id)
        supervisor.cancel(job.id)  # idempotent, and counted once
        assert [(j.id, j.status) for j in finished] == [(job.id, "cancelled")]
        assert finished[0].started_at is None  # never ran: no duration to observe
    finally:
        supervisor.shutdown(5)


def test_observer_errors_never_stop_supervision(store_with_model: ModelStore) -> None:
    def broken(job: JobRecord) -> None:
        raise RuntimeError("observer bug")

    supervisor = JobSupervisor(store_with_model, on_finished=broken, max_concurrent=0)
    supervisor.start()
    try:
        job = store_with_model.jobs.create("tiny", "v1", {"criterion": "uniform"})
        assert supervisor.cancel(job.id).status == "cancelled"
    finally:
        supervisor.shutdown(5)


@pytest.mark.anyio
async def test_app_exports_jobs_failed_at_startup(model_dirs: ModelDirs, store_with_model: ModelStore) -> None:
    """A job a previous server left running is failed when the admin API starts, and counted with its
    run time; the in-progress gauge reads 0."""
    store = store_with_model
    job = store.jobs.create("tiny", "v1", {"criterion": "uniform"})
    store.jobs.update(job.id, status="running", stage="training")
    settings = make_settings(model_dirs, model_store=store.root, admin_token="adm")
    async with running_app(settings) as (app, client):
        assert app.state.admin is not None
        text = (await client.get("/metrics")).text
    assert value(text, "eas_conversion_jobs_total", status="failed") == 1
    assert value(text, "eas_conversion_job_duration_seconds_count", status="failed") == 1
    assert value(text, "eas_conversion_jobs_in_progress") == 0
    assert ModelStore(store.root).jobs.get(job.id).status == "failed"
