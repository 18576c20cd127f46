"""Follow the registry's active version: how an activation made anywhere reaches every replica.

With a shared registry (PostgreSQL, several serving processes or pods), an activation is a registry write by
whichever process made it: a conversion Job's `eas convert --activate`, one replica's admin API. Every
serving process runs a follower that polls the registry's active pointers (one indexed query,
`ModelStore.active_versions`) every `EAS_FOLLOW_INTERVAL_S` and, when the served model's active version is not
what it serves, hot-swaps to it with the same zero-drop activation as the admin API (service/admin/
activation.py: load and warm beside, swap, retire the old runner after its admitted requests), without
writing the registry again (it only follows). The lag from the registry write to the swap starting is at most
one interval plus one query; the swap itself takes what loading and warming the version take.

Polling rather than LISTEN/NOTIFY: it needs no dedicated connection per replica, survives database restarts
and failovers with nothing to re-subscribe, works the same over SQLite, and at one query a second per
replica costs the database nothing measurable (docs/model-store.md has the numbers).

A version that fails to load (corrupted files, out of memory) is logged and not retried until the registry
points somewhere else; the replica keeps serving what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.lifecycle import Phase, Service, run_in_daemon_thread

log = logging.getLogger(__name__)

Activate = Callable[[str, str], Awaitable[Any]]


class ActiveFollower:
    """Polls the store's active pointer of the served model and activates locally when it moved."""

    def __init__(self, service: Service, store: Any, activate: Activate, *, model: str | None,
                 interval_s: float) -> None:
        self.service = service
        self.store = store
        self.activate = activate  # Activator.activate with record=False: follow, never write
        self.model = model
        self.interval_s = interval_s
        self._failed: tuple[str, str] | None = None  # the last version that would not load
        self._task: asyncio.Task[None] | None = None
        # For tests and /metrics-style introspection: how many swaps this follower made, and when.
        self.swaps = 0
        self.last_swap_unix: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="follow-active-version")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def served(self) -> tuple[str, str] | None:
        """(model, version) of the default variant this process serves now, or None while it serves nothing."""
        default = self.service.registry.default_variant
        if default is None:
            return None
        info = self.service.registry.get(default).info
        return info.model, info.version

    async def poll_once(self) -> bool:
        """One look at the registry; returns whether it swapped."""
        if self.service.phase not in (Phase.READY, Phase.FAILED):
            return False  # still loading (the loader reads the registry itself) or shutting down
        wanted = await run_in_daemon_thread(self._wanted)
        if wanted is None or wanted == self.served() or wanted == self._failed:
            return False
        name, version = wanted
        log.info("registry: %s:%s is active, this replica serves %s; following", name, version, self.served())
        try:
            await self.activate(name, version)
        except Exception as exc:  # any failure leaves the current model serving
            self._failed = wanted
            log.error("could not follow the registry to %s:%s (keeping %s): %s", name, version, self.served(), exc)
            return False
        self._failed = None
        self.swaps += 1
        self.last_swap_unix = time.time()
        return True

    def _wanted(self) -> tuple[str, str] | None:
        active = self.store.active_versions()
        name = self.model or self.store.default_model()
        if name is None or name not in active:
            return None
        return name, active[name]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a registry outage must not end following
                log.warning("following the registry's active version: %s", exc)


async def start_follower(service: Service, store: Any | None, activator: Any | None) -> ActiveFollower | None:
    """Start following when the settings ask for it (EAS_FOLLOW_ACTIVE; unset: on exactly when the registry is
    PostgreSQL) and the process serves from the store. `store`/`activator`: the admin API's, when it runs (one
    activation lock for both); otherwise the follower opens the store read-only-friendly (no seeding)."""
    settings = service.settings
    if settings.model_path is not None or settings.baseline_path is not None:
        return None  # serving directories, not the store: nothing to follow
    from model_store import ModelStore
    from model_store.registry import registry_url_from_env
    from service.admin.activation import Activator

    enabled = settings.follow_active if settings.follow_active is not None else registry_url_from_env() is not None
    if not enabled:
        return None
    if store is None:
        store = await run_in_daemon_thread(ModelStore, settings.model_store)
    if activator is None:
        activator = Activator(service, store, asyncio.get_running_loop())

    async def follow(name: str, version: str) -> Any:
        return await activator.activate(name, version, record=False)

    follower = ActiveFollower(service, store, follow, model=settings.model, interval_s=settings.follow_interval_s)
    follower.start()
    log.info("following the registry's active version every %.2f s", settings.follow_interval_s)
    return follower
