"""model_store: the durable registry of models, immutable versions and conversion jobs.

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
from model_store.store import DEFAULT_EMBEDDED_DIR, EMBEDDED_MODEL_NAME, ModelStore

__all__ = [
    "DEFAULT_EMBEDDED_DIR",
    "EMBEDDED_MODEL_NAME",
    "Conflict",
    "InvalidName",
    "InvalidTransition",
    "JobRecord",
    "JobStatus",
    "Kind",
    "ModelFilesError",
    "ModelStore",
    "NotFound",
    "StoreError",
    "VersionInfo",
    "VersionWriteError",
]
