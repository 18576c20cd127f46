"""The registry's tables as SQLAlchemy Core objects, one definition for both backends.

SQLite (the default, a file inside the store) and PostgreSQL (`EAS_REGISTRY_URL`) get the same columns,
constraints and partial unique indexes; values keep the shapes the SQLite registry always had (ISO-8601 text
timestamps, 0/1 integers for flags, JSON as text), so a store's rows mean the same on either backend.

Insertion order: SQLite tables have an implicit `rowid`; PostgreSQL tables get an identity column `ord`
instead (added only there, so existing SQLite files need no migration). `insertion_order` picks the right one.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy.sql.elements import ColumnElement

SCHEMA_VERSION = 1


class Tables:
    """The four tables of one dialect: `meta`, `models`, `versions`, `jobs`."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.metadata = MetaData()

        def order() -> list[Column[int]]:
            return [Column("ord", BigInteger, Identity(), nullable=False)] if dialect != "sqlite" else []

        self.meta = Table(
            "meta", self.metadata,
            Column("key", Text, primary_key=True),
            Column("value", Text, nullable=False),
        )
        self.models = Table(
            "models", self.metadata,
            Column("name", Text, primary_key=True),
            Column("created_at", Text, nullable=False),
            *order(),
        )
        self.versions = Table(
            "versions", self.metadata,
            Column("model", Text, nullable=False),
            Column("version", Text, nullable=False),
            Column("seq", Integer, CheckConstraint("seq > 0"), nullable=False),
            Column("kind", Text, CheckConstraint("kind IN ('baseline', 'converted')"), nullable=False),
            Column("parent_model", Text),
            Column("parent_version", Text),
            Column("created_at", Text, nullable=False),
            Column("metadata", Text, nullable=False, server_default="{}"),
            Column("active", Integer, CheckConstraint("active IN (0, 1)"), nullable=False, server_default="0"),
            ForeignKeyConstraint(["model"], ["models.name"]),
            ForeignKeyConstraint(["parent_model", "parent_version"], ["versions.model", "versions.version"]),
            CheckConstraint("(parent_model IS NULL) = (parent_version IS NULL)"),
            PrimaryKeyConstraint("model", "version"),
            UniqueConstraint("model", "seq"),
        )
        # At most one active version per model, enforced by the database itself.
        Index("versions_one_active", self.versions.c.model, unique=True,
              sqlite_where=self.versions.c.active == 1, postgresql_where=self.versions.c.active == 1)
        self.jobs = Table(
            "jobs", self.metadata,
            Column("id", Text, primary_key=True),
            Column("model", Text, nullable=False),
            Column("source_version", Text, nullable=False),
            Column("params", Text, nullable=False),
            Column("params_hash", Text, nullable=False),
            Column("status", Text, CheckConstraint(
                "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"), nullable=False),
            Column("progress", Float, CheckConstraint("progress >= 0 AND progress <= 1"), nullable=False,
                   server_default="0"),
            Column("stage", Text, nullable=False, server_default=""),
            Column("created_at", Text, nullable=False),
            Column("started_at", Text),
            Column("finished_at", Text),
            Column("error", Text),
            Column("result", Text),
            Column("idempotency_key", Text, unique=True),
            Column("worker_pid", Integer),
            Column("cancel_requested", Integer, CheckConstraint("cancel_requested IN (0, 1)"), nullable=False,
                   server_default="0"),
            ForeignKeyConstraint(["model", "source_version"], ["versions.model", "versions.version"]),
            # What became of a requested activation (model_store/jobs.py); older SQLite files get them added.
            Column("activation", Text),
            Column("activation_error", Text),
            *order(),
        )
        # One conversion per model at a time (serving-conventions §6): a second one is a 409.
        unfinished = self.jobs.c.status.in_(["queued", "running"])
        Index("jobs_one_unfinished_per_model", self.jobs.c.model, unique=True,
              sqlite_where=unfinished, postgresql_where=unfinished)
        Index("jobs_by_status", self.jobs.c.status, self.jobs.c.created_at)

    def insertion_order(self, table: Table) -> ColumnElement[int]:
        """The column that orders rows as they were inserted (rowid on SQLite, the identity column elsewhere)."""
        if self.dialect == "sqlite":
            return literal_column(f"{table.name}.rowid")
        return table.c.ord
