"""Conversion jobs in worker processes: success, kill -9 mid-job, server restart, cancel, the settings a
worker gets, expiry of finished jobs.

Most tests run real `python -m service.admin.worker` workers on a tiny model; bounded by deadlines.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from model_store import JobRecord, ModelStore
from service.admin import supervisor as supervisor_module
from service.admin.supervisor import JobSupervisor
from service.runner import forkserver
from service.settings import Settings

FAST = dict(
    criterion="uniform", skip_count=2, steps=4, batch_size=4, val_size=8, calibration_samples=4,
    evaluate_accuracy=False, latency_runs=1, latency_prompts=1, latency_new_tokens=2, device="cpu",
)
SLOW = {**FAST, "steps": 100_000}  # trains long enough to be interrupted


def wait_for(predicate: Callable[[], JobRecord | bool | None], timeout_s: float = 90.0) -> JobRecord | bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout_s} s")


def _finished(store: ModelStore, job_id: str) -> Callable[[], JobRecord | None]:
    return lambda: (job if (job := store.jobs.get(job_id)).finished else None)


def _training(store: ModelStore, job_id: str) -> Callable[[], JobRecord | None]:
    return lambda: (job if (job := store.jobs.get(job_id)).stage.startswith("train") else None)


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "plain-start"])
def test_job_runs_in_a_worker_process_and_adds_a_version(
    tiny_store: ModelStore, shapes_jsonl: Path, monkeypatch: pytest.MonkeyPatch, forked: bool
) -> None:
    """The worker forked by the fork server (service/runner/forkserver.py) or started afresh: the same job,
    the same result, its output in the job's log either way."""
    finished: list[tuple[str, str]] = []
    activations: list[tuple[str, str]] = []
    workers: list[int] = []
    spawned: list[object] = []

    def spy(*args: object, **kwargs: object) -> object:
        spawned.append(process := forkserver.fork_module(*args, **kwargs))  # type: ignore[arg-type]
        return process

    monkeypatch.setattr(supervisor_module, "fork_module", spy)
    # The worker gets its share from the server's settings on its command line, never from the environment.
    monkeypatch.setenv("EAS_JOB_THREADS", "2")
    monkeypatch.setenv("EAS_JOB_NICE", "0")
    settings = Settings(job_nice=3, job_threads=1, job_pin=True, forkserver=forked)
    supervisor = JobSupervisor(tiny_store, settings, activate=lambda *ref: activations.append(ref),
                               on_finished=lambda job: finished.append((job.id, job.status)),
                               on_workers_changed=workers.append)
    supervisor.start()
    try:
        job = tiny_store.jobs.create("tiny", "v1", {**FAST, "dataset": str(shapes_jsonl)})
        supervisor.submit()
        done = wait_for(_finished(tiny_store, job.id))
        assert done.status == "succeeded", done.error
        assert done.worker_pid not in (None, os.getpid())
        assert done.result["version"] == "v2" and list(done.result["plan"]["skipped"]) == [1, 3]
        assert [v.version for v in tiny_store.list_versions("tiny")] == ["v1", "v2"]
        assert tiny_store.active("tiny").version == "v1"  # activate was not asked for
        wait_for(lambda: finished == [(job.id, "succeeded")], 5)
        assert activations == []  # ... so the server was not asked to activate either
        assert workers == [1, 0]  # the server is told when a worker takes cores and gives them back
        worker_log = (supervisor.log_dir / f"{job.id}.log").read_text()
        assert f"niceness {os.nice(0) + 3}, 1 torch threads" in worker_log
        if forked:
            assert len(spawned) == 1 and isinstance(spawned[0], forkserver.ForkedProcess)
            assert spawned[0].pid == done.worker_pid and spawned[0].returncode == 0
        else:
            assert spawned == []
    finally:
        supervisor.shutdown()


def test_worker_command_carries_the_job_settings(tiny_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    pinned = JobSupervisor(tiny_store, Settings(job_nice=7, job_threads=2, job_pin=True)).worker_command("j1")
    assert pinned[-6:] == ["--nice", "7", "--threads", "2", "--pin", "j1"]
    assert pinned[pinned.index("--store") + 1] == str(tiny_store.root)
    default = JobSupervisor(tiny_store, Settings(job_pin=False)).worker_command("j2")
    assert default[-6:] == ["--nice", "10", "--threads", "3", "--no-pin", "j2"]  # 0 threads: all cores but one


def test_worker_killed_mid_job_fails_the_job_and_leaves_the_store_consistent(
    tiny_store: ModelStore, shapes_jsonl: Path
) -> None:
    supervisor = JobSupervisor(tiny_store)
    supervisor.start()
    try:
        job = tiny_store.jobs.create("tiny", "v1", {**SLOW, "dataset": str(shapes_jsonl)})
        supervisor.submit()
        running = wait_for(_training(tiny_store, job.id))
        os.kill(running.worker_pid, signal.SIGKILL)
        failed = wait_for(_finished(tiny_store, job.id))
    finally:
        supervisor.shutdown()
    assert failed.status == "failed" and "SIGKILL" in failed.error
    reopened = ModelStore(tiny_store.root)
    assert [v.version for v in reopened.list_versions("tiny")] == ["v1"]
    assert reopened.active("tiny").version == "v1"
    assert reopened.recover() == {"staging": [], "orphans": []}
    reopened.verify("tiny", "v1")


def test_restart_fails_jobs_the_dead_server_left_running(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    first = JobSupervisor(tiny_store)
    first.start()
    job = tiny_store.jobs.create("tiny", "v1", {**SLOW, "dataset": str(shapes_jsonl)})
    first.submit()
    running = wait_for(_training(tiny_store, job.id))
    # The server dies hard: its supervisor thread never reaps, the worker is killed with it.
    first._stop.set()
    os.killpg(running.worker_pid, signal.SIGKILL)
    second = JobSupervisor(ModelStore(tiny_store.root))
    assert second.start() == [job.id]
    try:
        failed = tiny_store.jobs.get(job.id)
        assert failed.status == "failed" and "restarted" in failed.error
        assert [v.version for v in tiny_store.list_versions("tiny")] == ["v1"]
    finally:
        second.shutdown()


def test_cancel_stops_the_worker_and_writes_nothing(tiny_store: ModelStore, shapes_jsonl: Path) -> None:
    supervisor = JobSupervisor(tiny_store)
    supervisor.start()
    try:
        job = tiny_store.jobs.create("tiny", "v1", {**SLOW, "dataset": str(shapes_jsonl)})
        supervisor.submit()
        wait_for(_training(tiny_store, job.id))
        supervisor.cancel(job.id)
        cancelled = wait_for(_finished(tiny_store, job.id), 30)
    finally:
        supervisor.shutdown()
    assert cancelled.status == "cancelled"
    assert [v.version for v in tiny_store.list_versions("tiny")] == ["v1"]
    assert tiny_store.recover() == {"staging": [], "orphans": []}


def test_bad_parameters_fail_the_job_with_the_reason(tiny_store: ModelStore, tmp_path: Path) -> None:
    supervisor = JobSupervisor(tiny_store)
    supervisor.start()
    try:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"image": "missing.png", "question": "q?", "answer": "a"}\nnot json\n')
        job = tiny_store.jobs.create("tiny", "v1", {**FAST, "dataset": str(bad)})
        supervisor.submit()
        failed = wait_for(_finished(tiny_store, job.id))
    finally:
        supervisor.shutdown()
    assert failed.status == "failed"
    assert "line 1" in failed.error and "line 2" in failed.error


def test_thread_budget_leaves_the_job_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from service.runner.threads import ThreadBudget

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    budget = ThreadBudget(job_threads=3)
    budget.full = 4
    assert budget.threads == 4
    budget.set_running_jobs(1)
    assert budget.threads == 1
    before = torch.get_num_threads()
    try:
        assert budget.apply() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    budget.set_running_jobs(0)
    assert budget.threads == 4


def _finished_job(store: ModelStore, **params: object) -> JobRecord:
    job = store.jobs.create("tiny", "v1", dict(params))
    store.jobs.update(job.id, status="running")
    return store.jobs.update(job.id, status="failed", error="for the test")


def test_finished_jobs_expire_after_the_ttl_running_ones_never(tiny_store: ModelStore) -> None:
    now = datetime.now(UTC)
    clock = [now]
    supervisor = JobSupervisor(tiny_store, Settings(job_ttl_s=3600), clock=lambda: clock[0])
    supervisor.log_dir.mkdir(parents=True, exist_ok=True)
    old = _finished_job(tiny_store, seed=1)
    (supervisor.log_dir / f"{old.id}.log").write_text("worker output\n")
    running = tiny_store.jobs.create("tiny", "v1", {"seed": 2})
    tiny_store.jobs.update(running.id, status="running")

    assert supervisor.expire_finished() == []  # younger than the ttl
    clock[0] = now + timedelta(hours=2)
    assert supervisor.expire_finished() == [old.id]
    assert not (supervisor.log_dir / f"{old.id}.log").exists()
    clock[0] = now + timedelta(days=365)
    assert supervisor.expire_finished() == []
    assert [j.id for j in tiny_store.jobs.select()] == [running.id]


def test_start_expires_old_finished_jobs(tiny_store: ModelStore) -> None:
    old = _finished_job(tiny_store)
    supervisor = JobSupervisor(tiny_store, Settings(job_ttl_s=60),
                               clock=lambda: datetime.now(UTC) + timedelta(minutes=5))
    supervisor.start()
    try:
        assert tiny_store.jobs.select() == []
        assert supervisor.expiry_interval_s == 60  # then every min(ttl, 60 s)
    finally:
        supervisor.shutdown()
    with pytest.raises(LookupError):
        tiny_store.jobs.get(old.id)
