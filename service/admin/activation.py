"""Hot activation of a model-store version: load and warm it beside what serves now, swap, then mark it
active in the store. A version that fails its checksums or its load is refused and the current model
keeps serving; requests in flight finish on the runner they started on (Service.replace_variant).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from functools import partial

from model_store import ModelStore
from service.lifecycle import Service, run_in_daemon_thread
from service.runner.resolve import store_variants
from service.runner.runner import VariantInfo

log = logging.getLogger(__name__)


class Activator:
    """Serialises activations: two at once would race on the registry and the store's active flag."""

    def __init__(self, service: Service, store: ModelStore, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.store = store
        self.loop = loop  # the server's event loop, where activations run
        self._lock = asyncio.Lock()

    def activate_from_thread(self, name: str, version: str) -> Future[list[VariantInfo]]:
        """Activate from another thread (the job supervisor's, after a job that asked for it succeeded)
        without waiting for it; a failure is logged and the current model keeps serving. The returned future
        says how it ended (the supervisor records that in the job's row, from its own thread)."""
        def report(done: Future[list[VariantInfo]]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("hot activation of %s:%s failed: %s", name, version, done.exception())

        future = asyncio.run_coroutine_threadsafe(self.activate(name, version), self.loop)
        future.add_done_callback(report)
        return future

    async def activate(self, name: str, version: str, *, record: bool = True) -> list[VariantInfo]:
        """`record=False`: swap without marking the version active in the store, for a replica that follows
        an activation already in the registry (service/runner/follower.py)."""
        async with self._lock:
            # Verifies every file's checksum (store I/O): off the event loop.
            infos = await run_in_daemon_thread(partial(store_variants, self.store, name, version,
                                                       load_baseline=self.service.settings.load_baseline))
            served_now = {s.variant: s.info for s in self.service.registry.all()}
            for index, info in enumerate(infos):
                current = served_now.get(info.variant)
                if current is not None and (current.model, current.version) == (info.model, info.version):
                    continue  # already serving exactly this version under this variant
                await self.service.replace_variant(info, default=index == 0)
            if infos[0].variant == "baseline" and "eas" in served_now:
                # A baseline activated on its own: stop serving the converted variant of the old version.
                old = self.service.registry.remove("eas")
                if old is not None:
                    await self.service.retire(old)
                del old  # unreferenced before the collection below
            self.service.registry.set_default(infos[0].variant)
            if record:
                await run_in_daemon_thread(self.store.activate, name, version)
            self.service.recovered()  # a server whose own load failed serves this version now
            # The replaced runners are unreferenced now (none is bound in this frame): one full collection
            # frees their models' cycles, and the new model's objects are frozen with the rest.
            self.service.resettle()
            log.info("activated %s:%s (%s)", name, version, ", ".join(i.variant for i in infos))
            return infos
