"""`ModelStore`: the durable registry of models, their immutable versions and conversion jobs.

Layout under `root/`:

    store.sqlite3            registry (WAL): models, versions, active flags, default model, jobs; absent when
                             the registry is PostgreSQL (`registry_url` / $EAS_REGISTRY_URL, model_store/registry.py)
    models/<name>/<vN>/      one immutable version: model files + eas_manifest.json (read-only files)
    .staging/                scratch space for versions being written (same filesystem → atomic rename)

The registry row is the commit point of a new version: its directory is written and sealed in staging,
renamed into place and registered in one transaction, so a reader either sees a complete, checksummed
version or nothing. Crash leftovers (staging directories, renamed-but-unregistered versions) are removed
when a store is opened. Every public method is safe to call from several threads and processes (and, with
PostgreSQL, nodes sharing the directory).

A store whose directory the process cannot write (a read-only volume: serving pods in a cluster) opens
read-only: no crash recovery (a writer's job), no seeding; reading, verifying and activating (a registry
write, no file) work as usual, and adding a version is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eas.files import copy_tree
from eas.manifest import MANIFEST_NAME, ModelFilesError, verify_manifest
from model_store import registry, versions
from model_store.errors import InvalidName, NotFound, StoreError, VersionWriteError
from model_store.jobs import Jobs
from model_store.registry import DB_NAME, KINDS, Kind, Registry, VersionInfo, registry_url_from_env

log = logging.getLogger(__name__)

_DEFAULT_MODEL_KEY = "default_model"


class ModelStore:
    """Models, versions and jobs over one directory. See the module docstring for the layout."""

    def __init__(self, root: str | Path, *, busy_timeout_s: float = 30.0, registry_url: str | None = None,
                 read_only: bool | None = None) -> None:
        """Open (creating if needed) the store at `root` and clean up after any crashed writer.

        `registry_url`: a PostgreSQL DSN for the registry; None → `$EAS_REGISTRY_URL`, and when that is unset
        too, the SQLite file `root/store.sqlite3`. `read_only`: None → read-only exactly when `root` exists and
        this process cannot write it.
        """
        self.root = Path(root)
        self.registry_url = registry_url or registry_url_from_env()
        if read_only is None:
            read_only = self.root.is_dir() and not os.access(self.root, os.W_OK)
        self.read_only = read_only
        if self.read_only and self.registry_url is None:
            raise StoreError(f"model store {self.root} is read-only, and its SQLite registry needs write access: "
                             f"mount it read-write, or use a PostgreSQL registry (EAS_REGISTRY_URL)")
        if not self.read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        self.models_root = self.root / "models"
        if not self.read_only:
            self.models_root.mkdir(exist_ok=True)
        self._staging = versions.Staging(self.root / ".staging")
        self._registry = Registry(self.root / DB_NAME, url=self.registry_url, busy_timeout_s=busy_timeout_s)
        # Conversion jobs: rows in the same registry database (model_store/jobs.py).
        self.jobs = Jobs(self._registry)
        if not self.read_only:
            self.recover()

    def __repr__(self) -> str:
        where = "" if self.registry_url is None else f", registry={self._registry.describe()!r}"
        return f"ModelStore({str(self.root)!r}{where})"

    @staticmethod
    def exists(root: str | Path, *, registry_url: str | None = None) -> bool:
        """Whether `root` holds a model store: its SQLite registry file, or with a PostgreSQL registry its
        `models/` directory (the registry itself lives elsewhere)."""
        root = Path(root)
        if (registry_url or registry_url_from_env()) is not None:
            return (root / "models").is_dir()
        return (root / DB_NAME).is_file()

    def active_versions(self) -> dict[str, str]:
        """model → active version, for every model, in one query: what a serving replica polls to follow
        activations made by other processes (service/runner/follower.py)."""
        with self._registry.read() as conn:
            return registry.active_versions(conn)

    # --- crash recovery -------------------------------------------------------------------------------

    def recover(self) -> dict[str, list[str]]:
        """Remove dead writers' staging directories and version directories that have no registry row.

        The orphan scan runs under the registry's write lock: a live writer renames its version into
        place and registers it under that same lock, so an unregistered directory seen here is never a
        write in progress. Returns what was removed, for logging and tests.
        """
        if self.read_only:
            raise StoreError(f"model store {self.root} is read-only: crash recovery is a writer's job")
        stale = self._staging.clean_stale()
        evicted: list[Path] = []
        orphans: list[str] = []
        with self._registry.write() as conn:
            for model_dir in sorted(p for p in self.models_root.iterdir() if p.is_dir()):
                for version_dir in sorted(model_dir.iterdir()):
                    if versions.parse_version(version_dir.name) is None:
                        continue  # not ours to judge
                    if not registry.version_exists(conn, model_dir.name, version_dir.name):
                        moved = self._staging.evict(version_dir)
                        if moved is not None:
                            evicted.append(moved)
                            orphans.append(f"{model_dir.name}/{version_dir.name}")
        for path in evicted:
            versions.remove_tree(path)
        if orphans:
            log.warning("model store: removed unregistered version directories %s", orphans)
        return {"staging": stale, "orphans": orphans}

    # --- writing versions -----------------------------------------------------------------------------

    def add_version(
        self,
        name: str,
        write: Callable[[Path], None],
        *,
        kind: Kind,
        parent: tuple[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        activate: bool = False,
    ) -> VersionInfo:
        """Create the next version of `name` from files that `write(directory)` puts in a fresh directory.

        All or nothing: the store writes the checksum manifest, fsyncs, renames the directory into
        `models/<name>/<vN>/` and registers it in one transaction. On any failure (the callback raising,
        disk full, ...) no directory, row or staging leftover remains and the error propagates: an
        `OSError` as `VersionWriteError` (still an `OSError`, same errno, message naming the model), any
        other exception unchanged. The first version of a model becomes active; later ones only with
        `activate=True`. `parent` = `(model, version)` this one was derived from (required for converted
        versions, which is what `baseline_of` follows).
        """
        info = self._add_version(
            name, write, kind=kind, parent=parent, metadata=metadata, activate=activate, only_if_empty=False
        )
        assert info is not None  # only_if_empty=False always publishes or raises
        return info

    def import_directory(
        self,
        name: str,
        src_dir: str | Path,
        *,
        kind: Kind = "baseline",
        parent: tuple[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        activate: bool = False,
    ) -> VersionInfo:
        """Copy an existing model directory in as the next version of `name` (same guarantees as
        `add_version`). If the source carries a checksum manifest, the copy is verified against it, so a
        corrupted source is refused instead of being sealed as good."""
        src = Path(src_dir)
        if not src.is_dir():
            raise NotFound(f"cannot import {src}: not a directory")
        return self.add_version(
            name,
            lambda d: _copy_verified(src, d),
            kind=kind,
            parent=parent,
            metadata=metadata,
            activate=activate,
        )

    def import_if_empty(self, name: str, src_dir: str | Path, *, metadata: dict[str, Any] | None = None
                        ) -> VersionInfo | None:
        """Import `src_dir` as the store's first model (`name` v1, baseline, active), or nothing when the
        store already holds a model; returns the new version or None.

        The emptiness check is repeated under the write lock, so of several processes doing this on one empty
        store at once exactly one imports (how the service seeds a fresh store, service/seed.py).
        """
        src = Path(src_dir)
        if not src.is_dir():
            raise NotFound(f"cannot import {src}: not a directory")
        with self._registry.read() as conn:
            if registry.has_models(conn):
                return None  # the common case at every start: no copy at all
        return self._add_version(name, lambda d: _copy_verified(src, d), kind="baseline", parent=None,
                                 metadata=metadata, activate=True, only_if_empty=True)

    def _add_version(
        self,
        name: str,
        write: Callable[[Path], None],
        *,
        kind: str,
        parent: tuple[str, str] | None,
        metadata: dict[str, Any] | None,
        activate: bool,
        only_if_empty: bool,
    ) -> VersionInfo | None:
        if self.read_only:
            raise StoreError(f"model store {self.root} is read-only (this process cannot write it): versions are "
                             "added by a writer with the volume mounted read-write (a conversion Job)")
        if not versions.is_valid_name(name):
            raise InvalidName(
                f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 128, not starting "
                "with '.' or containing '..')"
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if parent is not None:
            if kind == "baseline":
                raise ValueError("a baseline version has no parent; parents are for converted versions")
            if len(parent) != 2:
                raise ValueError(f"parent must be (model, version), got {parent!r}")
            parent = (str(parent[0]), str(parent[1]))
            self.get_version(*parent)  # fail before writing anything
        elif kind == "converted":
            raise ValueError("a converted version needs parent=(model, version) of its source")
        try:
            metadata_json = json.dumps(metadata or {}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"version metadata must be plain JSON: {exc}") from exc

        step = "writing the files"
        try:
            with self._staging.new_dir() as stage:
                write(stage)
                step = "sealing the files (checksums, fsync)"
                versions.seal(stage)
                step = "publishing the version"
                return self._publish(stage, name, kind, parent, metadata_json, activate, only_if_empty)
        except StoreError:
            raise
        except OSError as exc:
            detail = exc.strerror or str(exc)
            if exc.filename:
                detail = f"{detail}: {exc.filename}"
            message = f"model {name!r}: {step} failed ({detail}); no version was created"
            raise (VersionWriteError(exc.errno, message) if exc.errno else VersionWriteError(message)) from exc
        except BaseException as exc:
            exc.add_note(f"model store: {step} for model {name!r} failed; no version was created")
            raise

    def _publish(
        self,
        stage: Path,
        name: str,
        kind: str,
        parent: tuple[str, str] | None,
        metadata_json: str,
        activate: bool,
        only_if_empty: bool,
    ) -> VersionInfo | None:
        """Rename into place and register, under the write lock; undo the rename if registering fails."""
        target: Path | None = None
        try:
            with self._registry.write() as conn:
                if only_if_empty and registry.has_models(conn):
                    return None
                if parent is not None and not registry.version_exists(conn, *parent):
                    raise registry.missing_version(conn, *parent)
                registered = registry.max_seq(conn, name)
                seq = max(registered, versions.disk_max_seq(self.models_root / name)) + 1
                version = versions.format_version(seq)
                target = self.models_root / name / version
                versions.publish(stage, target)
                registry.insert_version(
                    conn,
                    model=name,
                    version=version,
                    seq=seq,
                    kind=kind,
                    parent=parent,
                    metadata_json=metadata_json,
                    active=activate or registered == 0,
                )
                info = registry.fetch_version(conn, name, version, self.models_root)
        except BaseException:
            if target is not None:
                versions.unpublish(target, stage)
            raise
        log.info("model store: created %s (%s)", info.ref, kind)
        return info

    # --- reading the registry -------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Model names, in the order they were first added."""
        with self._registry.read() as conn:
            return registry.model_names(conn)

    def list_versions(self, name: str) -> list[VersionInfo]:
        """All registered versions of `name`, oldest first; `NotFound` for an unknown model."""
        with self._registry.read() as conn:
            found = registry.fetch_versions(conn, name, self.models_root)
            if not found:
                raise registry.missing_version(conn, name, None)
            return found

    def get_version(self, name: str, version: str | None = None) -> VersionInfo:
        """One version; `version=None` means the active one. `NotFound` names what does exist."""
        with self._registry.read() as conn:
            return registry.fetch_version(conn, name, version, self.models_root)

    def active(self, name: str) -> VersionInfo:
        """The version of `name` that is served when no version is named."""
        return self.get_version(name)

    def baseline_of(self, name: str, version: str | None = None) -> VersionInfo | None:
        """The unskipped source of a version, following parent links.

        A baseline is its own source (returned as is); a converted version leads to the nearest baseline
        ancestor. None only when the chain leaves the store's knowledge (not possible for versions created
        through this API, which require an existing parent).
        """
        with self._registry.read() as conn:
            info = registry.fetch_version(conn, name, version, self.models_root)
            seen = {info.ref}
            while info.kind != "baseline":
                if info.parent is None:
                    return None
                info = registry.fetch_version(conn, *info.parent, self.models_root)
                if info.ref in seen:  # defensive: parents are created first, so cycles cannot be written
                    raise StoreError(f"parent links of {name}:{version} form a cycle at {info.ref}")
                seen.add(info.ref)
            return info

    def conversion_source(self, name: str, version: str | None = None) -> VersionInfo:
        """The version a conversion of `name` starts from: `version` as named, or with none named the active
        version, or its baseline when the active version is itself a conversion (converting a model that
        already serves a conversion means converting its original again). A named converted version is
        returned as is, for the caller to refuse."""
        info = self.get_version(name, version)
        if version is None and info.kind == "converted":
            return self.baseline_of(name, info.version) or info
        return info

    def default_model(self) -> str | None:
        """The model served when a request names none: the explicit setting, else the first model added;
        None for an empty store."""
        with self._registry.read() as conn:
            names = registry.model_names(conn)
            chosen = registry.get_meta(conn, _DEFAULT_MODEL_KEY)
        if chosen in names:
            return chosen
        return names[0] if names else None

    def set_default_model(self, name: str) -> None:
        """Make `name` the model served when a request names none."""
        with self._registry.write() as conn:
            if name not in registry.model_names(conn):
                raise registry.missing_version(conn, name, None)
            registry.set_meta(conn, _DEFAULT_MODEL_KEY, name)

    # --- activation -----------------------------------------------------------------------------------

    def activate(self, name: str, version: str, *, verify: bool = False) -> VersionInfo:
        """Make `version` the active version of `name` (exactly one active per model, one transaction).

        The serving layer should load and warm the version first (`path_for_loading` verifies it) and
        call this last, so the old version keeps serving until the swap. `verify=True` re-checks the
        checksums here too.
        """
        if verify:
            self.verify(name, version)
        with self._registry.write() as conn:
            if not registry.version_exists(conn, name, version):
                raise registry.missing_version(conn, name, version)
            registry.set_active(conn, name, version)
            info = registry.fetch_version(conn, name, version, self.models_root)
        log.info("model store: activated %s", info.ref)
        return info

    # --- verification ---------------------------------------------------------------------------------

    def verify(self, name: str, version: str | None = None) -> VersionInfo:
        """Check every file of a version against its manifest.

        Raises `ModelFilesError` naming the missing, resized or corrupted file (or the missing manifest).
        """
        info = self.get_version(name, version)
        verify_manifest(info.path, require=True)
        return info

    def path_for_loading(self, name: str | None = None, version: str | None = None) -> Path:
        """The directory of a verified version, ready for `load_model(path, verify=False)` (hashed once).

        `name=None` → the default model; `version=None` → its active version. A corrupted version raises
        `ModelFilesError` so the caller refuses it and keeps serving what it has.
        """
        return self.verify(self._resolve_name(name), version).path

    def _resolve_name(self, name: str | None) -> str:
        if name is not None:
            return name
        default = self.default_model()
        if default is None:
            raise NotFound("the model store is empty: no model to serve")
        return default


def _copy_verified(src: Path, dst: Path) -> None:
    """Copy a model directory's contents and check the copy against the source's manifest when it has
    one."""
    copy_tree(src, dst)
    if (dst / MANIFEST_NAME).is_file():
        try:
            verify_manifest(dst, require=True)
        except ModelFilesError as exc:
            raise ModelFilesError(f"refusing to import {src}: the copy does not match its manifest ({exc})") from exc
