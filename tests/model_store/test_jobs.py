"""Conversion-job records: idempotency, one conversion per model, status transitions, restarts, TTL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from model_store import Conflict, InvalidTransition, JobRecord, ModelStore, NotFound
from model_store.registry import parse_time
from tests.model_store.helpers import dummy_writer


@pytest.fixture
def jobs_store(store: ModelStore) -> ModelStore:
    for name in ("a", "b", "c"):
        store.add_version(name, dummy_writer(), kind="baseline")
        store.add_version(name, dummy_writer(), kind="converted", parent=(name, "v1"))
    return store


PARAMS = {"skip_layers": 4, "calibration": {"samples": 32}}


def test_create_records_a_queued_job(jobs_store: ModelStore) -> None:
    job = jobs_store.jobs.create("a", "v1", PARAMS, idempotency_key="key-1")
    assert isinstance(job, JobRecord)
    assert (job.status, job.progress, job.stage, job.error, job.result) == ("queued", 0.0, "", None, None)
    assert job.params == PARAMS and job.idempotency_key == "key-1" and len(job.params_hash) == 64
    assert job.started_at is None and job.finished_at is None and job.worker_pid is None
    assert parse_time(job.created_at).tzinfo is not None
    assert jobs_store.jobs.get(job.id) == job

    with pytest.raises(NotFound, match="no version 'v9'"):
        jobs_store.jobs.create("b", "v9", PARAMS)
    with pytest.raises(NotFound, match="unknown model 'zzz'"):
        jobs_store.jobs.create("zzz", "v1", PARAMS)
    with pytest.raises(NotFound):
        jobs_store.jobs.get("no-such-id")


def test_idempotency_key_returns_the_same_job_or_conflicts(jobs_store: ModelStore) -> None:
    first = jobs_store.jobs.create("a", "v1", PARAMS, idempotency_key="k")
    # Same key, same request (key order irrelevant) → the same job, not a conflict about the running one.
    again = jobs_store.jobs.create("a", "v1", dict(reversed(list(PARAMS.items()))), idempotency_key="k")
    assert again.id == first.id

    with pytest.raises(Conflict) as info:
        jobs_store.jobs.create("a", "v1", {**PARAMS, "skip_layers": 5}, idempotency_key="k")
    assert info.value.job_id == first.id and "different request" in str(info.value)
    with pytest.raises(Conflict):
        jobs_store.jobs.create("b", "v1", PARAMS, idempotency_key="k")  # same key, other target

    # Still the same job once it has finished.
    jobs_store.jobs.update(first.id, status="running")
    jobs_store.jobs.update(first.id, status="succeeded", result={"version": "v3"})
    replay = jobs_store.jobs.create("a", "v1", PARAMS, idempotency_key="k")
    assert replay.id == first.id and replay.status == "succeeded"
    assert len(jobs_store.jobs.select()) == 1


def test_one_unfinished_conversion_per_model(jobs_store: ModelStore) -> None:
    running = jobs_store.jobs.create("a", "v1", PARAMS)

    with pytest.raises(Conflict) as same_source:
        jobs_store.jobs.create("a", "v1", {"skip_layers": 2}, idempotency_key="other")
    assert same_source.value.job_id == running.id
    assert running.id in str(same_source.value)
    with pytest.raises(Conflict) as other_source:
        jobs_store.jobs.create("a", "v2", PARAMS)  # serving-conventions §6: per model, not per version
    assert other_source.value.job_id == running.id

    other_model = jobs_store.jobs.create("b", "v1", PARAMS)
    assert other_model.status == "queued"

    jobs_store.jobs.update(running.id, status="running")
    jobs_store.jobs.update(running.id, status="failed", error="out of memory")
    assert jobs_store.jobs.create("a", "v1", PARAMS).status == "queued"  # free again


def test_status_transitions_and_timestamps(jobs_store: ModelStore) -> None:
    job = jobs_store.jobs.create("a", "v1", PARAMS)
    with pytest.raises(InvalidTransition, match="queued; it cannot become succeeded"):
        jobs_store.jobs.update(job.id, status="succeeded")

    running = jobs_store.jobs.update(job.id, status="running", worker_pid=4242, stage="loading")
    assert running.status == "running" and running.worker_pid == 4242 and running.started_at is not None
    halfway = jobs_store.jobs.update(job.id, progress=0.5, stage="calibrating")
    assert (halfway.progress, halfway.stage, halfway.started_at) == (0.5, "calibrating", running.started_at)

    with pytest.raises(ValueError, match="progress"):
        jobs_store.jobs.update(job.id, progress=1.5)
    with pytest.raises(ValueError, match="unknown job status"):
        jobs_store.jobs.update(job.id, status="done")
    with pytest.raises(TypeError, match="params"):
        jobs_store.jobs.update(job.id, params={})
    assert jobs_store.jobs.get(job.id) == halfway  # refused updates changed nothing

    result = {"version": "v3", "benchmark": {"speedup": 1.4}}
    done = jobs_store.jobs.update(job.id, status="succeeded", result=result)
    assert done.status == "succeeded" and done.progress == 1.0 and done.result == result
    assert done.finished_at is not None and parse_time(done.finished_at) >= parse_time(done.started_at)

    for status in ("running", "failed", "cancelled", "succeeded"):
        with pytest.raises(InvalidTransition) as info:
            jobs_store.jobs.update(job.id, status=status)
        assert info.value.job_id == job.id
    with pytest.raises(InvalidTransition):
        jobs_store.jobs.update(job.id, progress=0.1)
    assert jobs_store.jobs.get(job.id) == done


def test_cancel_is_cooperative_and_idempotent(jobs_store: ModelStore) -> None:
    queued = jobs_store.jobs.create("a", "v1", PARAMS)
    cancelled = jobs_store.jobs.request_cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert jobs_store.jobs.request_cancel(queued.id) == cancelled

    running = jobs_store.jobs.create("b", "v1", PARAMS)
    jobs_store.jobs.update(running.id, status="running")
    flagged = jobs_store.jobs.request_cancel(running.id)
    assert flagged.status == "running" and flagged.cancel_requested  # the worker decides when to stop
    assert jobs_store.jobs.request_cancel(running.id) == flagged
    stopped = jobs_store.jobs.update(running.id, status="cancelled", stage="cancelled by request")
    assert stopped.status == "cancelled" and stopped.finished_at is not None

    finished = jobs_store.jobs.create("c", "v1", PARAMS)
    jobs_store.jobs.update(finished.id, status="running")
    finished = jobs_store.jobs.update(finished.id, status="succeeded")
    assert jobs_store.jobs.request_cancel(finished.id) == finished
    with pytest.raises(NotFound):
        jobs_store.jobs.request_cancel("missing")


def test_fail_interrupted_jobs_after_a_restart(jobs_store: ModelStore) -> None:
    queued = jobs_store.jobs.create("a", "v1", PARAMS)
    running = jobs_store.jobs.create("b", "v1", PARAMS)
    jobs_store.jobs.update(running.id, status="running", progress=0.3)
    done = jobs_store.jobs.create("c", "v1", PARAMS)
    jobs_store.jobs.update(done.id, status="running")
    done = jobs_store.jobs.update(done.id, status="succeeded")

    restarted = ModelStore(jobs_store.root)  # jobs are durable: a new process sees them
    assert sorted(restarted.jobs.fail_interrupted("interrupted: server restarted")) == sorted([queued.id, running.id])
    for job_id in (queued.id, running.id):
        job = restarted.jobs.get(job_id)
        assert job.status == "failed" and job.error == "interrupted: server restarted"
        assert job.finished_at is not None
    assert restarted.jobs.get(running.id).progress == pytest.approx(0.3)
    assert restarted.jobs.get(done.id) == done
    assert restarted.jobs.fail_interrupted("again") == []
    assert restarted.jobs.create("a", "v1", PARAMS).status == "queued"  # no longer blocked


def test_list_filters_pages_newest_first(jobs_store: ModelStore) -> None:
    ids = []
    for name in ("a", "b", "c"):
        job = jobs_store.jobs.create(name, "v1", PARAMS)
        ids.append(job.id)
    jobs_store.jobs.request_cancel(ids[0])

    assert [j.id for j in jobs_store.jobs.select()] == ids[::-1]
    assert [j.id for j in jobs_store.jobs.select(limit=2)] == ids[:0:-1]
    assert [j.id for j in jobs_store.jobs.select(limit=2, offset=2)] == ids[:1]
    assert [j.id for j in jobs_store.jobs.select(status="queued")] == ids[:0:-1]
    assert [j.id for j in jobs_store.jobs.select(status="cancelled")] == ids[:1]
    assert [j.id for j in jobs_store.jobs.select(model="b")] == ids[1:2]
    assert jobs_store.jobs.count() == 3 and jobs_store.jobs.count(status="queued") == 2
    with pytest.raises(ValueError):
        jobs_store.jobs.select(status="bogus")


def test_ttl_cleanup_removes_only_old_finished_jobs(jobs_store: ModelStore) -> None:
    finished = jobs_store.jobs.create("a", "v1", PARAMS, idempotency_key="old")
    jobs_store.jobs.request_cancel(finished.id)
    unfinished = jobs_store.jobs.create("b", "v1", PARAMS)

    assert jobs_store.jobs.cleanup(timedelta(hours=24)) == []  # too recent
    later = datetime.now(UTC) + timedelta(hours=25)
    assert jobs_store.jobs.cleanup(timedelta(hours=24), now=later) == [finished.id]

    assert [j.id for j in jobs_store.jobs.select()] == [unfinished.id]
    with pytest.raises(NotFound):
        jobs_store.jobs.get(finished.id)
    # The expired idempotency key can be used again.
    assert jobs_store.jobs.create("a", "v1", {"new": True}, idempotency_key="old").id != finished.id
