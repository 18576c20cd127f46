"""Errors raised by the model store.

One small hierarchy so that callers (the HTTP service, the CLI, conversion workers) can map failures to
responses without parsing messages: `NotFound` → 404, `Conflict` → 409, everything else under `StoreError`
→ 500 (the service's one table of these is in `service/errors.py`). Corrupted model files raise
`eas.manifest.ModelFilesError` (re-exported here), the same error `load_model` raises, so a caller handles
"refuse this model" in one place.
"""

from __future__ import annotations

from eas.manifest import ModelFilesError

__all__ = [
    "Conflict",
    "InvalidName",
    "InvalidTransition",
    "JobNotFound",
    "ModelFilesError",
    "NotFound",
    "StoreError",
    "VersionNotFound",
    "VersionWriteError",
]


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class NotFound(StoreError, LookupError):
    """An unknown model, version or job."""


class VersionNotFound(NotFound):
    """An unknown model, or a version its model does not have."""


class JobNotFound(NotFound):
    """An unknown conversion job."""


class Conflict(StoreError):
    """The request clashes with the store's current state.

    `job_id` names the job responsible when there is one (the running conversion, or the job that already
    owns an idempotency key), so an API can answer 409 with a pointer the client can follow.
    """

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class InvalidTransition(Conflict):
    """A job status change that its state machine forbids (e.g. anything out of a terminal status)."""


class InvalidName(StoreError, ValueError):
    """A model name that cannot be used as a directory name (names become path components)."""


class VersionWriteError(StoreError, OSError):
    """Writing a new version failed at the filesystem level (disk full, permissions, ...).

    It is also an `OSError` carrying the original `errno`, so `except OSError` and `exc.errno == ENOSPC`
    keep working, while the message says which model was being written and that nothing was stored.
    """
