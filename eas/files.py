"""File utilities the library and the store share (torch-free, so `model_store` may import it)."""

from __future__ import annotations

import shutil
from pathlib import Path

_COPY_IGNORE = shutil.ignore_patterns("__pycache__", ".git")


class _CopyFailed(Exception):
    """Carries a file copy's OSError through copytree, which would otherwise catch it and go on."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _copy_file(src: str, dst: str, *, follow_symlinks: bool = True) -> object:
    try:
        return shutil.copy2(src, dst, follow_symlinks=follow_symlinks)
    except OSError as exc:
        raise _CopyFailed(exc) from exc


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a directory's contents into `dst` (symlinks followed), stopping at the first failed file with
    its own OSError."""
    # copytree collects per-file errors into one shutil.Error (errno None, the causes flattened to
    # strings) after trying every remaining file, so a full disk came back without ENOSPC.
    try:
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=_COPY_IGNORE, copy_function=_copy_file)
    except _CopyFailed as failed:
        raise failed.error from None
