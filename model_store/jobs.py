"""Durable conversion-job records: creation with idempotency, a status state machine, cancellation.

The admin API (serving-conventions §6) is a thin layer over this: a job survives a server restart as a row,
`fail_interrupted` turns the ones a dead server left behind into honest failures, and the rules the
API promises (idempotency keys, one conversion per model, terminal jobs never change) are checked inside
one write transaction here, so two requests racing in different threads or processes cannot both win.

Status names: queued → running → succeeded | failed | cancelled (also queued → failed | cancelled). The
HTTP layer may spell them `pending`/`canceled` as §6 does; this module keeps one spelling.

A job created with `activate` records the outcome of that wish in its `activation` column (pending → done |
failed, the reason in `activation_error`); a job that does not succeed fails its pending activation with it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, inspect, select, text, update

from model_store import registry
from model_store.errors import Conflict, InvalidTransition, JobNotFound
from model_store.registry import Registry, tables, utc_now

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# Allowed status changes; staying in an unfinished status (progress updates) is allowed, leaving a
# terminal status never is.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"queued", "running", "failed", "cancelled"}),
    "running": frozenset({"running", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

UPDATABLE_FIELDS: frozenset[str] = frozenset({"status", "progress", "stage", "error", "result", "worker_pid"})

# A job that asked for `activate` records what became of that wish: `pending` until the server acts on it,
# then `done` or `failed` (with `activation_error`). NULL: activation was not asked for.
ActivationState = Literal["pending", "done", "failed"]
ACTIVATION_STATES: tuple[str, ...] = ("pending", "done", "failed")
# Added to stores created before the column existed (Jobs.__init__); new columns only ever get appended.
_ACTIVATION_COLUMNS = {"activation": "TEXT", "activation_error": "TEXT"}


@dataclass(frozen=True)
class JobRecord:
    """One conversion job as stored. Timestamps are ISO-8601 UTC strings (`...Z`)."""

    id: str
    model: str
    source_version: str
    params: dict[str, Any] = field(hash=False)  # dicts are unhashable
    status: JobStatus
    progress: float
    stage: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    result: dict[str, Any] | None = field(hash=False)
    idempotency_key: str | None
    params_hash: str
    worker_pid: int | None
    # Set by request_cancel on a running job; the worker polls it and stops cooperatively.
    cancel_requested: bool = field(default=False)
    # What became of a requested activation (None: not requested); see ActivationState.
    activation: ActivationState | None = field(default=None)
    activation_error: str | None = field(default=None)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def params_hash(model: str, source_version: str, params: dict[str, Any]) -> str:
    """Hash of the whole request (target and parameters), so "same key, different body" is detectable."""
    try:
        canonical = json.dumps(
            {"model": model, "source_version": source_version, "params": params},
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"job params must be plain JSON: {exc}") from exc
    return hashlib.sha256(canonical.encode()).hexdigest()


def _row_to_job(row: Any) -> JobRecord:
    row = row._mapping
    return JobRecord(
        id=row["id"],
        model=row["model"],
        source_version=row["source_version"],
        params=json.loads(row["params"]),
        status=row["status"],
        progress=float(row["progress"]),
        stage=row["stage"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        result=None if row["result"] is None else json.loads(row["result"]),
        idempotency_key=row["idempotency_key"],
        params_hash=row["params_hash"],
        worker_pid=row["worker_pid"],
        cancel_requested=bool(row["cancel_requested"]),
        activation=row["activation"],
        activation_error=row["activation_error"],
    )


def _job_columns(conn: Connection) -> Any:
    return select(*(c for c in tables(conn).jobs.c if c.name != "ord"))


def _fetch(conn: Connection, job_id: str) -> JobRecord:
    row = conn.execute(_job_columns(conn).where(tables(conn).jobs.c.id == job_id)).first()
    if row is None:
        raise JobNotFound(f"unknown job {job_id!r}")
    return _row_to_job(row)


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown job status {status!r} (one of {', '.join(STATUSES)})")


def _fail_pending_activation(conn: Connection, where: ColumnElement[bool], reason: str) -> None:
    jobs = tables(conn).jobs
    conn.execute(update(jobs).where(jobs.c.activation == "pending", where)
                 .values(activation="failed", activation_error=reason))


def _unfinished(conn: Connection) -> ColumnElement[bool]:
    return tables(conn).jobs.c.status.in_(["queued", "running"])


class Jobs:
    """Job persistence over the store's registry database: `ModelStore.jobs`."""

    def __init__(self, registry_db: Registry) -> None:
        self._db = registry_db
        self._add_activation_columns()

    def _add_activation_columns(self) -> None:
        """Stores written before activation outcomes were recorded lack the two columns: add them."""
        with self._db.read() as conn:
            present = {c["name"] for c in inspect(conn).get_columns("jobs")}
        missing = {name: kind for name, kind in _ACTIVATION_COLUMNS.items() if name not in present}
        if not missing:
            return
        with self._db.write() as conn:
            present = {c["name"] for c in inspect(conn).get_columns("jobs")}  # another process may have won
            for name, kind in missing.items():
                if name not in present:
                    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))

    def create(
        self,
        model: str,
        source_version: str,
        params: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        activate: bool = False,
    ) -> JobRecord:
        """Queue a conversion of `model:source_version`; with `activate`, its activation starts `pending`.

        Same idempotency key and same request → the existing job (whatever its status). Same key with a
        different request → `Conflict`. An unfinished job for the same model → `Conflict` carrying its id
        (one conversion per model at a time). Unknown source version → `VersionNotFound`.
        """
        params = dict(params or {})
        digest = params_hash(model, source_version, params)
        with self._db.write() as conn:
            jobs = tables(conn).jobs
            if idempotency_key is not None:
                row = conn.execute(_job_columns(conn).where(jobs.c.idempotency_key == idempotency_key)).first()
                if row is not None:
                    existing = _row_to_job(row)
                    if existing.params_hash != digest:
                        raise Conflict(
                            f"idempotency key {idempotency_key!r} was already used for job {existing.id} "
                            "with a different request",
                            job_id=existing.id,
                        )
                    return existing
            if not registry.version_exists(conn, model, source_version):
                raise registry.missing_version(conn, model, source_version)
            row = conn.execute(select(jobs.c.id, jobs.c.status)
                               .where(jobs.c.model == model, _unfinished(conn))).first()
            if row is not None:
                raise Conflict(
                    f"a conversion of model {model!r} is already {row.status} (job {row.id})",
                    job_id=row.id,
                )
            job_id = str(uuid.uuid4())
            conn.execute(insert(jobs).values(
                id=job_id, model=model, source_version=source_version, params=json.dumps(params),
                params_hash=digest, status="queued", created_at=utc_now(), idempotency_key=idempotency_key,
                activation="pending" if activate else None))
            return _fetch(conn, job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._db.read() as conn:
            return _fetch(conn, job_id)

    def select(
        self, status: str | None = None, *, model: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Newest first, optionally filtered by status and model."""
        _check_status(status)
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        with self._db.read() as conn:
            t = tables(conn)
            query = (_job_columns(conn).where(*self._filters(conn, status, model))
                     .order_by(t.jobs.c.created_at.desc(), t.insertion_order(t.jobs).desc())
                     .limit(limit).offset(offset))
            return [_row_to_job(r) for r in conn.execute(query)]

    def count(self, status: str | None = None, *, model: str | None = None) -> int:
        """Total matching `select`'s filters, for paging."""
        _check_status(status)
        with self._db.read() as conn:
            jobs = tables(conn).jobs
            query = select(func.count()).select_from(jobs).where(*self._filters(conn, status, model))
            return int(conn.execute(query).scalar_one())

    @staticmethod
    def _filters(conn: Connection, status: str | None, model: str | None) -> list[ColumnElement[bool]]:
        jobs = tables(conn).jobs
        clauses = []
        if status is not None:
            clauses.append(jobs.c.status == status)
        if model is not None:
            clauses.append(jobs.c.model == model)
        return clauses

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Change status/progress/stage/error/result/worker_pid; returns the updated record.

        Status changes follow `TRANSITIONS` (`InvalidTransition` otherwise; a terminal job never changes).
        `started_at` is stamped on entering `running`, `finished_at` on entering a terminal status, and a
        success ends at progress 1.
        """
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise TypeError(f"cannot update job field(s) {sorted(unknown)}; allowed: {sorted(UPDATABLE_FIELDS)}")
        _check_status(fields.get("status"))
        if "progress" in fields:
            progress = float(fields["progress"])
            if not 0.0 <= progress <= 1.0:
                raise ValueError(f"progress must be within [0, 1], got {progress}")
            fields["progress"] = progress
        if fields.get("result") is not None and not isinstance(fields["result"], dict):
            raise TypeError("result must be a dict or None")
        with self._db.write() as conn:
            job = _fetch(conn, job_id)
            new_status = fields.get("status", job.status)
            if new_status not in TRANSITIONS[job.status]:
                raise InvalidTransition(f"job {job_id} is {job.status}; it cannot become {new_status}", job_id=job_id)
            columns = dict(fields)
            if "result" in columns:
                columns["result"] = None if columns["result"] is None else json.dumps(columns["result"])
            if new_status == "running" and job.started_at is None:
                columns["started_at"] = utc_now()
            if new_status in TERMINAL:
                columns["finished_at"] = utc_now()
                if new_status == "succeeded" and "progress" not in columns:
                    columns["progress"] = 1.0
                if new_status != "succeeded" and job.activation == "pending":
                    columns["activation"] = "failed"
                    columns["activation_error"] = f"the job ended {new_status}: nothing to activate"
            if columns:
                jobs = tables(conn).jobs
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(**columns))
            return _fetch(conn, job_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel cooperatively; idempotent.

        A queued job is cancelled at once (nothing runs it yet). A running job gets `cancel_requested`; its
        worker stops at the next check and records `cancelled`. A terminal job is returned unchanged.
        """
        with self._db.write() as conn:
            jobs = tables(conn).jobs
            job = _fetch(conn, job_id)
            if job.status == "queued":
                conn.execute(update(jobs).where(jobs.c.id == job_id)
                             .values(status="cancelled", cancel_requested=1, finished_at=utc_now()))
                _fail_pending_activation(conn, jobs.c.id == job_id, "the job ended cancelled: nothing to activate")
            elif job.status == "running":
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested=1))
            return _fetch(conn, job_id)

    def fail_interrupted(self, reason: str) -> list[str]:
        """Mark every queued/running job failed with `reason`; returns their ids.

        Called at server start (and on shutdown): jobs run inside the server, so an unfinished row means
        its worker is gone and nobody will ever finish it.
        """
        with self._db.write() as conn:
            jobs = tables(conn).jobs
            ids = list(conn.execute(select(jobs.c.id).where(_unfinished(conn))).scalars())
            _fail_pending_activation(conn, _unfinished(conn), f"the job failed: {reason}")
            conn.execute(update(jobs).where(_unfinished(conn))
                         .values(status="failed", error=reason, finished_at=utc_now()))
        return ids

    def set_activation(self, job_id: str, state: ActivationState, error: str | None = None) -> JobRecord:
        """Record what became of a requested activation (the server calls this once it has acted)."""
        if state not in ACTIVATION_STATES:
            raise ValueError(f"unknown activation state {state!r} (one of {', '.join(ACTIVATION_STATES)})")
        with self._db.write() as conn:
            jobs = tables(conn).jobs
            _fetch(conn, job_id)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(activation=state, activation_error=error))
            return _fetch(conn, job_id)

    def fail_pending_activations(self, reason: str) -> list[str]:
        """Fail every still-pending activation of a finished job (a server stopped between the job's success
        and acting on it); returns the job ids."""
        with self._db.write() as conn:
            jobs = tables(conn).jobs
            where = and_(jobs.c.activation == "pending", jobs.c.status.in_(sorted(TERMINAL)))
            ids = list(conn.execute(select(jobs.c.id).where(where)).scalars())
            _fail_pending_activation(conn, where, reason)
            return ids

    def cleanup(self, ttl: timedelta, *, now: datetime | None = None) -> list[str]:
        """Delete finished jobs older than `ttl` (by `finished_at`); returns their ids. Queued and running
        jobs are never deleted, however old. The server runs this periodically with `Settings.job_ttl_s`
        (service/admin/supervisor.py).

        Their idempotency keys become free again, as with any TTL-bound idempotency store.
        """
        reference = now if now is not None else datetime.now(UTC)
        if reference.tzinfo is None:
            reference = reference.replace(tzinfo=UTC)
        cutoff = registry.format_time(reference - ttl)
        with self._db.write() as conn:
            jobs = tables(conn).jobs
            expired = and_(jobs.c.status.in_(sorted(TERMINAL)), jobs.c.finished_at < cutoff)
            ids = list(conn.execute(select(jobs.c.id).where(expired)).scalars())
            conn.execute(delete(jobs).where(expired))
            return ids
