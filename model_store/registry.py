"""The registry: models, versions, active pointers, the default model and jobs, in SQLite or PostgreSQL.

One setting chooses the backend (`ModelStore(registry_url=...)`, else `$EAS_REGISTRY_URL`): none means the
SQLite file `store.sqlite3` inside the store (single node, the default); a `postgresql://` DSN means a
PostgreSQL database that several processes on several nodes share (cluster). The tables are one SQLAlchemy
Core definition (model_store/schema.py) and every query below is written once for both.

The database is the single source of truth for what exists: a version directory on disk without a row is
an interrupted write and is never listed. Every write runs in one short transaction that first takes the
registry's one write lock, so read-then-write logic (next version number, "is a job already running?") cannot
race with another process: SQLite's `BEGIN IMMEDIATE` (with a busy timeout), PostgreSQL's transaction-level
advisory lock (with `lock_timeout`). Reads see one consistent snapshot (a SQLite read transaction, a
PostgreSQL REPEATABLE READ read-only transaction).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import NullPool

from model_store.errors import StoreError, VersionNotFound
from model_store.schema import SCHEMA_VERSION, Tables

DB_NAME = "store.sqlite3"
REGISTRY_URL_ENV = "EAS_REGISTRY_URL"
# Key of the PostgreSQL advisory lock every write transaction takes (any constant shared by all processes).
_WRITE_LOCK_KEY = 0x0EA5_5E57

Kind = Literal["baseline", "converted"]
KINDS: tuple[str, ...] = ("baseline", "converted")


def registry_url_from_env() -> str | None:
    """`$EAS_REGISTRY_URL`, or None when unset or empty (then the store's own SQLite file is the registry)."""
    return os.environ.get(REGISTRY_URL_ENV) or None


def postgres_url(url: str) -> str:
    """A PostgreSQL DSN as SQLAlchemy's psycopg 3 URL (`postgresql://` and `postgres://` are accepted too);
    `StoreError` for anything else, naming the setting, without echoing a password."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"{REGISTRY_URL_ENV} is not a database URL ({exc.__class__.__name__})") from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise StoreError(f"{REGISTRY_URL_ENV} must be a PostgreSQL URL (postgresql://user:password@host:port/db), "
                     f"got the scheme {parsed.drivername!r}; leave it unset for the SQLite file in the store")


def describe_url(url: str) -> str:
    """The URL for logs and errors, password hidden."""
    return make_url(url).render_as_string(hide_password=True)


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


# Engines are per process (a forked child must not share its parent's sockets) and shared by every
# ModelStore of that process that names the same database, so opening stores stays cheap.
_ENGINES: dict[tuple[int, str], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(key: str, build: Any) -> Engine:
    with _ENGINES_LOCK:
        engine = _ENGINES.get((os.getpid(), key))
        if engine is None:
            engine = _ENGINES[(os.getpid(), key)] = build()
        return engine


def _sqlite_engine(path: Path, busy_timeout_s: float) -> Engine:
    # A connection per operation (NullPool), as before: cheap, and safe across threads and processes.
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool,
                           connect_args={"timeout": busy_timeout_s, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun explicitly (read/write below)
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        # FULL: a registry row that was acknowledged survives a power cut (WAL stays consistent either way).
        dbapi_connection.execute("PRAGMA synchronous = FULL")

    return engine


def _postgres_engine(url: str, busy_timeout_s: float) -> Engine:
    timeout_ms = int(busy_timeout_s * 1000)
    return create_engine(
        postgres_url(url),
        pool_size=4, max_overflow=8, pool_pre_ping=True, pool_recycle=1800,
        # lock_timeout bounds the wait for the write lock like SQLite's busy timeout does.
        connect_args={"connect_timeout": 10, "options": f"-c lock_timeout={timeout_ms}",
                      "application_name": "eas-serve"},
    )


class Registry:
    """Owns the database: schema creation and connection discipline, for SQLite or PostgreSQL."""

    def __init__(self, path: Path, *, url: str | None = None, busy_timeout_s: float = 30.0) -> None:
        """`path`: the SQLite file (used when `url` is None); `url`: a PostgreSQL DSN."""
        self.path = Path(path)
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        if url is None:
            self.dialect = "sqlite"
            self.engine = _engine(f"sqlite:{self.path.resolve()}", lambda: _sqlite_engine(self.path, busy_timeout_s))
        else:
            self.dialect = "postgresql"
            self.engine = _engine(url, lambda: _postgres_engine(url, busy_timeout_s))
        self.tables = Tables(self.dialect)
        self._init_schema()

    def describe(self) -> str:
        """Where the registry lives, for logs (a URL's password hidden)."""
        return str(self.path) if self.url is None else describe_url(self.url)

    def _init_schema(self) -> None:
        if self.dialect == "sqlite":
            with self.engine.connect() as conn:
                mode = self._enable_wal(conn.connection.dbapi_connection)
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
        try:
            with self.write() as conn:
                # Under the write lock: of several processes creating one fresh registry, one creates it.
                self.tables.metadata.create_all(conn, checkfirst=True)
                meta = self.tables.meta
                row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
                if row is None:
                    conn.execute(insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(row.value) > SCHEMA_VERSION:
                    raise StoreError(f"{self.describe()}: schema version {row.value} is newer than this code "
                                     f"({SCHEMA_VERSION})")
        except OperationalError as exc:
            raise StoreError(f"cannot open the registry at {self.describe()}: {exc.orig or exc}") from None

    def _enable_wal(self, conn: Any) -> str:
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
    def read(self) -> Iterator[Connection]:
        """A consistent snapshot for multi-statement reads."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN")
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            yield from _committed(conn)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One short write transaction, holding the registry's write lock from the start.

        SQLite: `BEGIN IMMEDIATE` takes the lock before any read. PostgreSQL: READ COMMITTED plus one advisory
        lock for all writers, taken first, so every statement after it sees every earlier writer's commit.
        """
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn = conn.execution_options(isolation_level="READ COMMITTED")
                conn.execute(select(func.pg_advisory_xact_lock(_WRITE_LOCK_KEY)))
            yield from _committed(conn)



def _committed(conn: Connection) -> Iterator[Connection]:
    """Hands out `conn`; commits when the block ends, rolls back when it raises (Registry.read/write)."""
    try:
        yield conn
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


# --- queries: each takes a connection from Registry.read()/write() and works on either backend ------------

_TABLES: dict[str, Tables] = {}


def tables(conn: Connection) -> Tables:
    """The table objects of the connection's dialect (built once per dialect)."""
    dialect = conn.dialect.name
    if dialect not in _TABLES:
        _TABLES[dialect] = Tables(dialect)
    return _TABLES[dialect]


def upsert(conn: Connection, table: Any, values: Mapping[str, Any], key: list[str], update_columns: list[str]) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE (or DO NOTHING), in the connection's dialect."""
    statement = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table).values(**values)
    if update_columns:
        statement = statement.on_conflict_do_update(index_elements=key,
                                                    set_={c: statement.excluded[c] for c in update_columns})
    else:
        statement = statement.on_conflict_do_nothing(index_elements=key)
    conn.execute(statement)


# --- meta ---------------------------------------------------------------------------------------------


def get_meta(conn: Connection, key: str) -> str | None:
    meta = tables(conn).meta
    return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()


def set_meta(conn: Connection, key: str, value: str) -> None:
    upsert(conn, tables(conn).meta, {"key": key, "value": value}, ["key"], ["value"])


# --- models and versions ------------------------------------------------------------------------------


def model_names(conn: Connection) -> list[str]:
    """Models that have at least one version, oldest first."""
    t = tables(conn)
    models, versions = t.models, t.versions
    has_version = select(versions.c.model).where(versions.c.model == models.c.name).exists()
    query = select(models.c.name).where(has_version).order_by(models.c.created_at, t.insertion_order(models))
    return list(conn.execute(query).scalars())


def has_models(conn: Connection) -> bool:
    versions = tables(conn).versions
    return conn.execute(select(versions.c.model).limit(1)).first() is not None


def max_seq(conn: Connection, model: str) -> int:
    versions = tables(conn).versions
    return int(conn.execute(select(func.max(versions.c.seq)).where(versions.c.model == model)).scalar() or 0)


def version_exists(conn: Connection, model: str, version: str) -> bool:
    versions = tables(conn).versions
    query = select(versions.c.seq).where(versions.c.model == model, versions.c.version == version)
    return conn.execute(query).first() is not None


def insert_version(
    conn: Connection,
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
    t = tables(conn)
    upsert(conn, t.models, {"name": model, "created_at": now}, ["name"], [])
    if active:
        conn.execute(update(t.versions).where(t.versions.c.model == model, t.versions.c.active == 1)
                     .values(active=0))
    parent_model, parent_version = parent or (None, None)
    conn.execute(insert(t.versions).values(
        model=model, version=version, seq=seq, kind=kind, parent_model=parent_model,
        parent_version=parent_version, created_at=now, metadata=metadata_json, active=int(active)))


def set_active(conn: Connection, model: str, version: str) -> None:
    versions = tables(conn).versions
    conn.execute(update(versions).where(versions.c.model == model, versions.c.active == 1,
                                        versions.c.version != version).values(active=0))
    conn.execute(update(versions).where(versions.c.model == model, versions.c.version == version).values(active=1))


def active_versions(conn: Connection) -> dict[str, str]:
    """model -> its active version, for every model: one cheap query (what serving replicas poll)."""
    versions = tables(conn).versions
    rows = conn.execute(select(versions.c.model, versions.c.version).where(versions.c.active == 1))
    return {row.model: row.version for row in rows}


def _row_to_info(row: Any, models_root: Path) -> VersionInfo:
    row = row._mapping
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


def _version_columns(conn: Connection) -> Any:
    versions = tables(conn).versions
    return select(*(c for c in versions.c if c.name != "ord"))


def fetch_versions(conn: Connection, model: str, models_root: Path) -> list[VersionInfo]:
    versions = tables(conn).versions
    rows = conn.execute(_version_columns(conn).where(versions.c.model == model).order_by(versions.c.seq))
    return [_row_to_info(r, models_root) for r in rows]


def fetch_version(conn: Connection, model: str, version: str | None, models_root: Path) -> VersionInfo:
    """The named version, or the active one when `version` is None; `NotFound` with the choices otherwise."""
    versions = tables(conn).versions
    which = versions.c.active == 1 if version is None else versions.c.version == version
    row = conn.execute(_version_columns(conn).where(versions.c.model == model, which)).first()
    if row is not None:
        return _row_to_info(row, models_root)
    raise missing_version(conn, model, version)


def missing_version(conn: Connection, model: str, version: str | None) -> VersionNotFound:
    """The `VersionNotFound` for a model or version that is not registered, listing what exists instead."""
    versions = tables(conn).versions
    known = list(conn.execute(select(versions.c.version).where(versions.c.model == model)
                              .order_by(versions.c.seq)).scalars())
    if not known:
        models = ", ".join(model_names(conn)) or "none"
        return VersionNotFound(f"unknown model {model!r} (known models: {models})")
    if version is None:  # cannot happen while versions_one_active and first-version activation hold
        return VersionNotFound(f"model {model!r} has no active version (versions: {', '.join(known)})")
    return VersionNotFound(f"model {model!r} has no version {version!r} (versions: {', '.join(known)})")
