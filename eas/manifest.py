"""A checksum manifest for a model directory: every file's SHA-256 and size.

Written last when a directory is saved and verified before anything in it is loaded, so a
truncated, corrupted or missing file is refused with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "eas_manifest.json"
_CHUNK = 1 << 20


class ModelFilesError(ValueError):
    """A model directory is incomplete or corrupted; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> dict[str, dict[str, int | str]]:
    """Record every regular file under `directory` (except the manifest itself)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    return files


def verify_manifest(directory: Path, *, require: bool = False) -> bool:
    """Check every file listed in the manifest. Returns False when there is no manifest (and
    `require` is off); raises ModelFilesError naming the first missing, resized or altered file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        if require:
            raise ModelFilesError(f"{directory}: no {MANIFEST_NAME}; cannot verify the model files")
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise ModelFilesError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            raise ModelFilesError(f"{directory}: file {rel} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise ModelFilesError(
                f"{directory}: file {rel} has {path.stat().st_size} bytes, expected {expected['bytes']}"
            )
        if sha256_file(path) != expected["sha256"]:
            raise ModelFilesError(f"{directory}: file {rel} is corrupted (SHA-256 mismatch)")
    return True
