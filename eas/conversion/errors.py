"""Errors of a conversion, so callers (CLI, admin jobs) can tell "cancelled" from "refused" from "broke"."""

from __future__ import annotations

import threading


class ConversionFailed(RuntimeError):
    """The conversion could not be carried out as asked; the message says why. Nothing was written."""


class Cancelled(RuntimeError):
    """The caller set the cancel event; the conversion stopped at the next check. Nothing was written."""


def check_cancel(cancel: threading.Event | None, where: str = "") -> None:
    """Raise Cancelled if `cancel` is set. Called at every step of every loop of a conversion."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"conversion cancelled{' during ' + where if where else ''}")
