"""`eas import`: check a `save_pretrained` directory and add it to a model store as a *baseline* version.

The check is `eas.model.checkpoint.check_checkpoint` (supported class, readable weights that match the
config, a loadable processor), the same one the admin API's `POST /admin/models/{name}/versions` runs;
nothing is written unless it passes. The store must exist unless `--create-store` is given (or it is the
default var/store, which `eas serve` would create too); an import never seeds the embedded model, so a new
store holds exactly what was imported. Every refusal is one `error:` line with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from eas_tools.common import fail, require_store, resolve_store


def import_command(
    directory: Annotated[Path, typer.Argument(help="a save_pretrained directory: config.json, safetensors "
                                                   "weights and the processor's files")],
    name: Annotated[str, typer.Option(help="model name in the store (a new model, or a new version of one)")],
    store: Annotated[Path | None, typer.Option(help="model store root (default: $EAS_MODEL_STORE, else "
                                                    "var/store)")] = None,
    create_store: Annotated[bool, typer.Option("--create-store", help="create the store if it does not exist")]
    = False,
    activate: Annotated[bool, typer.Option("--activate/--no-activate", help="make it the active version (a "
                                                                            "model's first version always is)")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the new version as JSON")] = False,
) -> None:
    """Check an HF checkpoint and add it to the model store as a baseline version (then: eas convert)."""
    from model_store.versions import is_valid_name

    if not is_valid_name(name):
        fail(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (not starting with '.')")
    root, creatable = resolve_store(store, create=create_store)
    require_store(root, create=creatable)
    if not directory.is_dir():
        fail(f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}")

    from eas.manifest import ModelFilesError
    from eas.model.checkpoint import CheckpointError, check_checkpoint  # torch only when a command runs
    from model_store import ModelStore, StoreError

    try:
        info = check_checkpoint(directory)
    except CheckpointError as exc:
        fail(str(exc))
    metadata = {"source": "import", "imported_from": str(directory.resolve()), **info.to_metadata()}
    try:
        version = ModelStore(root).import_directory(name, directory, kind="baseline", metadata=metadata,
                                                    activate=activate)
    except ModelFilesError as exc:  # the directory's own checksum manifest does not match its files
        fail(str(exc))
    except (StoreError, OSError) as exc:
        fail(str(exc), code=1)
    if as_json:
        typer.echo(json.dumps(version.to_dict(), indent=1))
        return
    state = "active" if version.active else f"not active; serving {ModelStore(root).active(name).ref}"
    typer.echo(f"imported {version.ref} (baseline, {state}) into {root}: {info.model_class}, {info.num_layers} "
               f"decoder layers, {info.parameters:,} parameters")
    typer.echo(f"next: eas convert --store {root} --model {name} --dataset DATA.jsonl --skip-fraction 0.5 --activate")
