"""Atomic version directories: stage, seal, publish by rename, and clean up after crashes.

A version directory only ever appears under `models/<name>/<version>/` complete, with its checksum manifest,
because it is written elsewhere first (`.staging/`, same filesystem) and moved in with a single
`rename(2)`. Every staging directory is guarded by an exclusive `flock` held by its writer for as long as
the directory exists, so a process that opens the store can tell a crashed writer's leftovers (lock free)
from a live writer's work in progress (lock held) and delete only the former. `flock` locks die with their
process, unlike pid files, which lie after a restart in a container where every server is pid 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eas.manifest import write_manifest

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"v([1-9][0-9]*)")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LOCK_SUFFIX = ".lock"
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def format_version(seq: int) -> str:
    return f"v{seq}"


def parse_version(version: str) -> int | None:
    """The sequence number of a version id like `v12`, or None for anything else."""
    match = _VERSION_RE.fullmatch(version)
    return int(match.group(1)) if match else None


def is_valid_name(name: str) -> bool:
    """Model names become directory names: letters, digits, `.`, `_`, `-`, not starting with a dot."""
    return bool(_NAME_RE.fullmatch(name)) and ".." not in name


def disk_max_seq(model_dir: Path) -> int:
    """Highest version number present on disk, registered or not.

    New numbers are allocated above it so a version never lands on an unregistered leftover directory.
    """
    if not model_dir.is_dir():
        return 0
    seqs = [parse_version(p.name) for p in model_dir.iterdir()]
    return max((s for s in seqs if s is not None), default=0)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(directory: Path) -> None:
    """Write the checksum manifest, make files read-only and flush everything to disk.

    Read-only files guard against accidental in-place edits of an immutable version; directories stay
    writable so a failed or orphaned version can still be removed by a non-root process.
    """
    write_manifest(directory)
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            path = Path(dirpath) / filename
            os.chmod(path, _READ_ONLY)
            fsync_path(path)
    for dirpath, _dirnames, _filenames in os.walk(directory, topdown=False):
        fsync_path(Path(dirpath))


def publish(staged: Path, target: Path) -> None:
    """Move a sealed staging directory into place with one rename, then make the rename durable.

    If the fsync after the rename fails, the directory is already at `target`; callers undo by checking
    for it (see `unpublish`).
    """
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, target)  # fails rather than merging if target exists and is not empty
    fsync_path(target.parent)
    if created:
        fsync_path(target.parent.parent)


def unpublish(target: Path, staged: Path) -> None:
    """Undo `publish` after a failure: move the directory back to staging, whose owner deletes it.

    Best effort: it runs while an error is already propagating, and a leftover is an unregistered
    orphan that is never listed and is removed by the next open. An empty `models/<name>/` may stay:
    removing it could race with another process publishing that model's first version.
    """
    with contextlib.suppress(OSError):
        if target.exists() and not staged.exists():
            os.rename(target, staged)


class Staging:
    """The `.staging/` area: fresh, locked scratch directories and removal of dead ones."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def new_dir(self) -> Iterator[Path]:
        """A fresh empty directory; whatever is still in it when the block exits is deleted.

        A directory that was published (renamed away) inside the block is simply gone by then.
        """
        fd, lock_path = self._new_lock()
        directory = lock_path.with_name(lock_path.name[: -len(_LOCK_SUFFIX)])
        try:
            directory.mkdir()
            try:
                yield directory
            finally:
                remove_tree(directory)
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            os.close(fd)

    def _new_lock(self) -> tuple[int, Path]:
        """Create and lock a fresh lock file, making sure no cleaner claimed it in between."""
        while True:
            lock_path = self.root / f"{uuid.uuid4().hex}{_LOCK_SUFFIX}"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                    return fd, lock_path
            except FileNotFoundError:
                pass
            # A cleaner took the lock between our create and flock and removed the file: start again.
            os.close(fd)

    def evict(self, path: Path) -> Path | None:
        """Move a directory out of the way into staging with one atomic rename; returns its new path.

        Used for orphaned versions: the rename is instant, so it can happen under the registry lock, and
        nothing half-deleted is ever visible under `models/`. The caller deletes the returned path (after
        releasing the lock); if it does not, the next `clean_stale` will.
        """
        graveyard = self.root / f"evicted-{uuid.uuid4().hex}"
        try:
            os.rename(path, graveyard)
        except FileNotFoundError:
            return None
        return graveyard

    def clean_stale(self) -> list[str]:
        """Delete leftovers of writers that died; keep directories whose writer still holds its lock.

        Returns the names removed, for logging.
        """
        removed = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.endswith(_LOCK_SUFFIX):
                if self._claim_dead(entry):
                    removed.append(entry.name[: -len(_LOCK_SUFFIX)])
            elif not (self.root / f"{entry.name}{_LOCK_SUFFIX}").exists():
                # No lock file: never a live writer's (the lock is created before the directory and
                # removed after it), so a crash leftover or a half-finished discard.
                remove_tree(entry)
                removed.append(entry.name)
        if removed:
            log.warning("model store: removed %d stale staging entr(y/ies): %s", len(removed), removed)
        return removed

    @staticmethod
    def _claim_dead(lock_path: Path) -> bool:
        """True (and the lock file removed) when no process holds this staging lock any more."""
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            return False  # its writer finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer
            # Holding the lock: the writer is gone. Delete its directory before the lock file so that a
            # directory never outlives its lock file (see clean_stale's no-lock rule).
            remove_tree(lock_path.with_name(lock_path.name[: -len(_LOCK_SUFFIX)]))
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            return True
        finally:
            os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree if it exists (read-only files included)."""
    with contextlib.suppress(FileNotFoundError):  # another process may be removing the same leftover
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
