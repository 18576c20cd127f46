"""The SQLite registry: schema, connections and the model/version queries.

The database is the single source of truth for what exists: a version directory on disk without a row is
an interrupted write and is never listed. Connections are opened per operation (cheap, and safe across
threads and forked/spawned processes); writes run in one short `BEGIN IMMEDIATE` transaction so concurrent
writers in several processes serialise on SQLite's lock (with a busy timeout) instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from model_store.errors import StoreError, VersionNotFound

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite3"

Kind = Literal["baseline", "converted"]
KINDS: tuple[str, ...] = ("baseline", "converted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    name       TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model          TEXT NOT NULL REFERENCES models(name),
    version        TEXT NOT NULL,
    seq            INTEGER NOT NULL CHECK (seq > 0),
    kind           TEXT NOT NULL CHECK (kind IN ('baseline', 'converted')),
    parent_model   TEXT,
    parent_version TEXT,
    created_at     TEXT NOT NULL,
    metadata       TEXT NOT NULL DEFAULT '{}',
    active         INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    PRIMARY KEY (model, version),
    UNIQUE (model, seq),
    FOREIGN KEY (parent_model, parent_version) REFERENCES versions(model, version),
    CHECK ((parent_model IS NULL) = (parent_version IS NULL))
);
-- At most one active version per model, enforced by the database itself.
CREATE UNIQUE INDEX IF NOT EXISTS versions_one_active ON versions(model) WHERE active = 1;
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    model            TEXT NOT NULL,
    source_version   TEXT NOT NULL,
    params           TEXT NOT NULL,
    params_hash      TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress         REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    stage            TEXT NOT NULL DEFAULT '',
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    error            TEXT,
    result           TEXT,
    idempotency_key  TEXT UNIQUE,
    worker_pid       INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    FOREIGN KEY (model, source_version) REFERENCES versions(model, version)
);
-- One conversion per model at a time (serving-conventions §6): a second one is a 409.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_unfinished_per_model
    ON jobs(model) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, created_at);
"""


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with a `Z`, millisecond precision: sortable as text, readable in JSON."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return format_time(datetime.now(UTC))


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class VersionInfo:
    """One immutable model version as the registry knows it.

    `path` is derived from the store root (not stored), so a store directory can be moved or mounted
    elsewhere. `parent` is `(model, version)` of the version this one was converted from.
    """

    name: str
    version: str
    kind: Kind
    parent: tuple[str, str] | None
    path: Path
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)  # dicts are unhashable
    active: bool = False

    @property
    def ref(self) -> str:
        """`name:version`, the form used in logs and error messages."""
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view for API responses."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["parent"] = list(self.parent) if self.parent else None
        return data


class Registry:
    """Owns the database file: schema creation and connection discipline."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._init_schema()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        # FULL: a registry row that was acknowledged survives a power cut (WAL stays consistent either way).
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            mode = self._enable_wal(conn)
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
        finally:
            conn.close()
        with self.write() as conn:
            # Statement by statement: executescript() would COMMIT the IMMEDIATE transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {row['value']} is newer than this code ({SCHEMA_VERSION})"
                )

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL (persistent in the file), retrying while another process holds a lock.

        Changing the journal mode does not go through SQLite's busy handler, so several processes
        creating the same fresh store at once would otherwise see an immediate "database is locked".
        """
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.005
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() == "wal":
                    return mode
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for multi-statement reads."""
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, holding SQLite's write lock from the start.

        `IMMEDIATE` takes the lock before any read, so read-then-write logic (next version number,
        "is a job already running?") cannot race with another process.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()


# --- meta ---------------------------------------------------------------------------------------------


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row["value"]


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


# --- models and versions ------------------------------------------------------------------------------


def model_names(conn: sqlite3.Connection) -> list[str]:
    """Models that have at least one version, oldest first."""
    rows = conn.execute(
        "SELECT name FROM models WHERE EXISTS (SELECT 1 FROM versions v WHERE v.model = models.name) "
        "ORDER BY created_at, rowid"
    ).fetchall()
    return [r["name"] for r in rows]


def has_models(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM versions LIMIT 1").fetchone() is not None


def max_seq(conn: sqlite3.Connection, model: str) -> int:
    row = conn.execute("SELECT MAX(seq) AS m FROM versions WHERE model = ?", (model,)).fetchone()
    return int(row["m"] or 0)


def version_exists(conn: sqlite3.Connection, model: str, version: str) -> bool:
    row = conn.execute("SELECT 1 FROM versions WHERE model = ? AND version = ?", (model, version)).fetchone()
    return row is not None


def insert_version(
    conn: sqlite3.Connection,
    *,
    model: str,
    version: str,
    seq: int,
    kind: str,
    parent: tuple[str, str] | None,
    metadata_json: str,
    active: bool,
) -> None:
    now = utc_now()
    conn.execute("INSERT INTO models(name, created_at) VALUES (?, ?) ON CONFLICT(name) DO NOTHING", (model, now))
    if active:
        conn.execute("UPDATE versions SET active = 0 WHERE model = ? AND active = 1", (model,))
    conn.execute(
        "INSERT INTO versions(model, version, seq, kind, parent_model, parent_version, created_at, metadata,"
        " active) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (model, version, seq, kind, *(parent or (None, None)), now, metadata_json, int(active)),
    )


def set_active(conn: sqlite3.Connection, model: str, version: str) -> None:
    conn.execute("UPDATE versions SET active = 0 WHERE model = ? AND active = 1 AND version != ?", (model, version))
    conn.execute("UPDATE versions SET active = 1 WHERE model = ? AND version = ?", (model, version))


def _row_to_info(row: sqlite3.Row, models_root: Path) -> VersionInfo:
    parent = (row["parent_model"], row["parent_version"]) if row["parent_model"] is not None else None
    return VersionInfo(
        name=row["model"],
        version=row["version"],
        kind=row["kind"],
        parent=parent,
        path=models_root / row["model"] / row["version"],
        created_at=row["created_at"],
        metadata=json.loads(row["metadata"]),
        active=bool(row["active"]),
    )


def fetch_versions(conn: sqlite3.Connection, model: str, models_root: Path) -> list[VersionInfo]:
    rows = conn.execute("SELECT * FROM versions WHERE model = ? ORDER BY seq", (model,)).fetchall()
    return [_row_to_info(r, models_root) for r in rows]


def fetch_version(conn: sqlite3.Connection, model: str, version: str | None, models_root: Path) -> VersionInfo:
    """The named version, or the active one when `version` is None; `NotFound` with the choices otherwise."""
    if version is None:
        row = conn.execute("SELECT * FROM versions WHERE model = ? AND active = 1", (model,)).fetchone()
    else:
        row = conn.execute("SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)).fetchone()
    if row is not None:
        return _row_to_info(row, models_root)
    raise missing_version(conn, model, version)


def missing_version(conn: sqlite3.Connection, model: str, version: str | None) -> VersionNotFound:
    """The `VersionNotFound` for a model or version that is not registered, listing what exists instead."""
    known = [r["version"] for r in conn.execute("SELECT version FROM versions WHERE model = ? ORDER BY seq", (model,))]
    if not known:
        models = ", ".join(model_names(conn)) or "none"
        return VersionNotFound(f"unknown model {model!r} (known models: {models})")
    if version is None:  # cannot happen while versions_one_active and first-version activation hold
        return VersionNotFound(f"model {model!r} has no active version (versions: {', '.join(known)})")
    return VersionNotFound(f"model {model!r} has no version {version!r} (versions: {', '.join(known)})")
