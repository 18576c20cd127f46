"""Accuracy harness: easy-vqa or JSONL evaluation of any model, and agreement between two models.

The names are loaded on first use (PEP 562), so `eas_tools.commands.evaluate`, which `eas --help` imports, does not
pull in torch through the harness.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["EvalReport", "agreement", "evaluate", "question_type"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("eas.evaluation.harness"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
