"""What every `eas` subcommand shares: one-line errors (exit code 2) and the model-store guard.

Only the standard library and typer at import time: `eas --help` imports every subcommand module, and
this module with them (tests/tools/cli/test_help.py keeps it that way).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer

# The store `eas serve` uses when EAS_MODEL_STORE is unset (service/settings.py); it is created and seeded
# with the embedded model on first use. Any other store must already exist unless a command is told to
# create it (--create-store), so a mistyped path never silently becomes a new store.
DEFAULT_STORE = Path("var/store")
STORE_ENV = "EAS_MODEL_STORE"

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print `error: message` on one line to stderr and exit (2 = bad arguments, paths or input)."""
    typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def store_exists(root: Path) -> bool:
    from model_store import ModelStore  # torch-free, but only needed once a command runs

    return ModelStore.exists(root)


def resolve_store(option: Path | None, *, create: bool) -> tuple[Path, bool]:
    """(store root, whether it may be created) for a `--store` option whose default is None.

    Unset option: $EAS_MODEL_STORE, else var/store. Only var/store reached that way may be created
    without --create-store (that is what `eas serve` does on first run)."""
    if option is not None:
        return option, create
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]), create
    return DEFAULT_STORE, True


def require_store(root: Path, *, create: bool, offers_create: bool = True) -> Path:
    """Refuse a store path that holds no model store unless `create`; never creates anything itself.
    `offers_create`: whether the command has a --create-store option to suggest."""
    if store_exists(root):
        return root
    if create:
        if root.exists() and not root.is_dir():
            fail(f"model store {root} is a file, not a directory")
        return root
    what = "does not exist" if not root.exists() else "is not a model store (no store.sqlite3 in it)"
    hint = ("or pass --create-store to create a new store there" if offers_create else
            "(a store is created by `eas serve`, `eas import` or `eas convert --create-store`)")
    fail(f"model store {root} {what}; check the path, {hint}")

# eas.conversion.data.EASY_VQA, spelled here because that module imports torch (tests/cli checks they agree).
EASY_VQA = "easy-vqa"
