"""model_store: the durable registry of models, immutable versions and conversion jobs (registry and
artefacts only: no model loading, no torch).

The serving layer talks to `ModelStore`; see docs/model-store.md for the layout and guarantees.
"""

from model_store.errors import (
    Conflict,
    InvalidName,
    InvalidTransition,
    ModelFilesError,
    NotFound,
    StoreError,
    VersionWriteError,
)
from model_store.jobs import JobRecord, JobStatus
from model_store.registry import Kind, VersionInfo
from model_store.serving import ServedVersion, served_versions
from model_store.store import ModelStore

__all__ = [
    "Conflict",
    "InvalidName",
    "InvalidTransition",
    "JobRecord",
    "JobStatus",
    "Kind",
    "ModelFilesError",
    "ModelStore",
    "NotFound",
    "ServedVersion",
    "StoreError",
    "VersionInfo",
    "VersionWriteError",
    "served_versions",
]
