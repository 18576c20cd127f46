"""Helpers for model_store tests: small dummy "model" directories and tree listings.

Most behaviour (atomicity, registry, jobs) does not depend on what the files contain, so dummy files keep
the tests fast; a real tiny LLaVA is used only where loading matters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def dummy_writer(payload: bytes = b"weights", **extra: bytes) -> Callable[[Path], None]:
    """A write callback producing a minimal model-like directory (config, weights, a nested file)."""

    def write(directory: Path) -> None:
        (directory / "config.json").write_text('{"model_type": "dummy"}')
        (directory / "model.safetensors").write_bytes(payload)
        (directory / "tokenizer").mkdir()
        (directory / "tokenizer" / "vocab.txt").write_text("a\nb\n")
        for name, data in extra.items():
            (directory / name).write_bytes(data)

    return write


def make_model_dir(path: Path, payload: bytes = b"embedded weights") -> Path:
    path.mkdir(parents=True)
    dummy_writer(payload)(path)
    return path


def tree(path: Path) -> list[str]:
    """Every entry under `path`, relative, sorted: for asserting that nothing was left behind."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def make_writable(path: Path) -> None:
    os.chmod(path, 0o644)
