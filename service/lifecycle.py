"""The service's life: load and warm every variant, serve, drain, stop.

Phases: `loading` → `ready` → `draining` → `stopped` (or `failed` if loading fails). Readiness is 200
only in `ready`: weights loaded and one real generation run per variant. Loading happens in a background
task (in a daemon thread, off the event loop) so the process answers `/health/live` and a 503 on
`/health/ready` meanwhile, which is what Kubernetes startup probes expect.

Draining (SIGTERM, or lifespan shutdown) stops admission at once (new requests and readiness get 503),
lets queued and running requests finish for up to `shutdown_timeout_s`, then fails what is left with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from eas.model.loading import LoadedModel, load_model, resolve_device
from service import allocator, heap
from service.batching.batcher import Batcher
from service.errors import QueueFull, ServiceError, ServiceUnavailable
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.runner import forkserver
from service.runner.process import ModelProcessGone, ProcessRunner
from service.runner.registry import RunnerRegistry, ServedVariant
from service.runner.resolve import resolve_variants
from service.runner.runner import ModelRunner, VariantInfo
from service.runner.threads import ThreadBudget
from service.settings import Settings
from service.validation.images import ImageLimits, public_detail

log = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[[VariantInfo, Settings], LoadedModel]
Resolver = Callable[[Settings], list[VariantInfo]]


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


def _isolate_failure(exc: Exception) -> bool:
    """Is a failed batch worth running again one request at a time? Yes, unless the model process is gone
    (died, hung and killed): a retry would only restart it once per request."""
    return not isinstance(exc, ModelProcessGone)


def default_loader(info: VariantInfo, settings: Settings) -> LoadedModel:
    loaded = load_model(info.path, device=settings.device, dtype=settings.dtype, name=info.model,
                        verify=not info.verified)
    loaded.decode_loop = settings.decode_loop
    return loaded


def uses_model_process(settings: Settings, loader: Loader) -> bool:
    """Run each variant's model in a process of its own (service/runner/process.py)? `EAS_MODEL_PROCESS`
    when set; unset: on exactly when the model runs on the CPU, where the parent's interpreter lock was
    measured to bound throughput, and the service loads with its own loader (a test's stand-in loader
    cannot cross to another process). On a GPU it stays off until measured there: a second process
    would hold a second CUDA context."""
    if settings.model_process is not None:
        return settings.model_process
    return loader is default_loader and resolve_device(settings.device).type == "cpu"


async def run_in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """Run a long, uncancellable call (model loading) in a daemon thread: a shutdown during loading
    must not wait for it, which the default executors (non-daemon, joined at exit) would."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result: object = fn(*args)
            ok = True
        except BaseException as exc:
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=target, name=f"load-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future


class Service:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        loader: Loader = default_loader,
        resolver: Resolver = resolve_variants,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = RunnerRegistry()
        # Lowered while conversion workers run (runner/threads.py).
        self.threads = ThreadBudget(settings.job_threads, settings.inference_threads)
        self.image_limits = ImageLimits.from_formats(settings.allowed_image_formats, settings.max_image_pixels,
                                                     settings.max_image_side, max_png_chunks=settings.max_png_chunks,
                                                     max_png_ancillary_bytes=settings.max_png_ancillary_bytes)
        # Image decode and the processor, per request, off the batch workers and (but for a small image on
        # an idle server) off the event loop.
        self.preprocessor = Preprocessor(settings.preprocess_threads, settings.max_decode_bytes,
                                         settings.retry_after_s, refusal_status=settings.queue_full_status,
                                         inline_when_idle=settings.prepare_inline_when_idle,
                                         niceness=settings.preprocess_niceness)
        self.model_process = uses_model_process(settings, loader)
        self.phase = Phase.LOADING
        self.started_unix = int(time.time())
        self.error: str | None = None
        self._loader = loader
        self._resolver = resolver
        self._loaded: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_deadline = 0.0

    # --- startup -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin loading in the background and return at once."""
        self._loaded = asyncio.Event()
        self.metrics.model_ready.set(0)
        if self.settings.malloc_reuse:  # before anything is loaded (service/allocator.py)
            allocator.keep_freed_memory()
        self._tasks = [asyncio.create_task(self._load(), name="load-variants"),
                       asyncio.create_task(self._watch_loop_lag(), name="loop-lag")]

    async def wait_loaded(self, timeout_s: float | None = None) -> Phase:
        """Wait until loading has finished, successfully or not; returns the phase."""
        assert self._loaded is not None, "start() first"
        await asyncio.wait_for(self._loaded.wait(), timeout_s)
        return self.phase

    async def _load(self) -> None:
        assert self._loaded is not None
        try:
            if self.model_process and self.settings.forkserver:
                forkserver.prestart()  # its imports overlap with resolving and loading the parent's copies
            infos = await run_in_daemon_thread(self._resolver, self.settings)
            if not infos:
                raise RuntimeError("nothing to serve: no variant resolved")
            # Loaded one by one (transformers' loading sets process-wide defaults), then warmed up side by
            # side: with model processes, the warm-up waits for each child's own start-up and load.
            runners: list[ModelRunner] = []
            try:
                for info in infos:
                    runners.append(await run_in_daemon_thread(self._make_runner, info))
                built = await asyncio.gather(*(run_in_daemon_thread(self._serve, r) for r in runners))
            except BaseException:
                for runner in runners:
                    runner.close()
                raise
            if self.phase is not Phase.LOADING:  # shutdown began meanwhile
                for runner in runners:
                    runner.close()
                return
            for index, served in enumerate(built):
                served.batcher.start()
                self.registry.install(served, default=index == 0)
                self._set_info_metric(served, 1)
            self.resettle()  # before READY: the one full collection of start-up, while nobody waits on it
            self.phase = Phase.READY
            self.metrics.model_ready.set(1)
            log.info("ready: serving %s (default %s)", ", ".join(
                f"{s.variant}={s.info.model}:{s.info.version}" for s in self.registry.all()),
                self.registry.default_variant)
        except Exception as exc:
            self.phase = Phase.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed; the service stays unready")
        finally:
            self._loaded.set()

    def _build(self, info: VariantInfo) -> ServedVariant:
        """Load, warm up and wrap one variant (runs in a thread)."""
        return self._serve(self._make_runner(info))

    def _make_runner(self, info: VariantInfo) -> ModelRunner:
        """Load one variant (in a thread); a ProcessRunner's child starts loading its own copy now."""
        t0 = time.perf_counter()
        model = self._loader(info, self.settings)
        if self.model_process:
            runner: ModelRunner = ProcessRunner(model, info, self.threads, loader=self._loader,
                                                settings=self.settings, max_rows=self.settings.max_batch_size)
        else:
            runner = ModelRunner(model, info, self.threads)
        log.info("variant %s: %s loaded from %s on %s/%s in %.2fs", info.variant, info.model, info.path,
                 runner.device, runner.dtype, time.perf_counter() - t0)
        return runner

    def _serve(self, runner: ModelRunner) -> ServedVariant:
        """Warm a loaded runner up and give it a batcher (in a thread)."""
        info = runner.info
        t0 = time.perf_counter()
        try:
            runner.warm_up(self.settings.default_max_new_tokens)
        except BaseException:
            runner.close()
            raise
        log.info("variant %s: warmed up in %.2fs", info.variant, time.perf_counter() - t0)
        s, m = self.settings, self.metrics
        labels = {"model": info.model, "variant": info.variant}
        depth = m.queue_depth.labels(**labels)
        m.queue_capacity.labels(**labels).set(s.max_queue_size)
        batcher = Batcher(
            runner.run_batch,
            name=info.variant,
            max_batch_size=s.max_batch_size,
            max_batch_wait_s=s.max_batch_wait_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            queue_full=self._queue_full_error,
            on_batch=m.batch_observer(info.model, info.variant),
            on_depth=depth.set,
            max_batch_tokens=s.max_batch_tokens,
            isolate_failures=_isolate_failure,
            # The model process takes a lone request straight from the event loop (service/batching/batcher.py).
            submit=runner.submit if isinstance(runner, ProcessRunner) and s.dispatch_from_loop else None,
            # The model process gets its next batch before the batch it just answered is resolved.
            defer_results=isinstance(runner, ProcessRunner),
            # An idle server's lone request runs here, on the weights shared with the model process.
            run_here=runner.run_here if isinstance(runner, ProcessRunner) and runner.serves_here else None,
        )
        if isinstance(runner, ProcessRunner):
            runner.on_sent = batcher.flush_deferred
        return ServedVariant(info=info, runner=runner, batcher=batcher)

    def _set_info_metric(self, served: ServedVariant, value: int) -> None:
        info, runner = served.info, served.runner
        labels = (info.model, info.variant, info.version, info.kind, runner.dtype, runner.device,
                  ",".join(map(str, runner.skipped_layers)))
        if value:
            self.metrics.model_info.labels(*labels).set(value)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(*labels)

    async def replace_variant(self, info: VariantInfo, *, default: bool = False) -> ServedVariant | None:
        """Hot activation: load and warm `info` beside what serves its variant now, swap atomically, then
        let the old runner finish what it admitted and stop it. Returns the replaced runner (None if new).

        Routes look a runner up and are admitted to its batcher in the same event-loop step, so after the
        swap no request can enter the old one; requests already in it complete there.
        """
        served = await run_in_daemon_thread(self._build, info)
        served.batcher.start()
        old = self.registry.install(served, default=default)
        self._set_info_metric(served, 1)
        if old is not None:
            await self.retire(old)
            log.info("variant %s: %s:%s replaced by %s:%s", info.variant, old.info.model, old.info.version,
                     info.model, info.version)
        return old

    async def retire(self, old: ServedVariant) -> None:
        """Stop a runner that is no longer in the registry: it finishes what it admitted (up to the shutdown
        timeout; leftovers get 503), then its worker stops."""
        self._set_info_metric(old, 0)
        old.batcher.stop_accepting()
        if not await old.batcher.wait_idle(self.settings.shutdown_timeout_s):
            old.batcher.fail_all(lambda: ServiceUnavailable("the model version was replaced before this "
                                                            "request completed", code="replaced"))
        old.batcher.stop()
        # Its worker thread holds the runner until it returns: joined, so that nothing of the old model is
        # still referenced when an activation ends by collecting and freezing the heap (resettle).
        await asyncio.to_thread(old.batcher.join, self.settings.shutdown_timeout_s)
        await asyncio.to_thread(old.runner.close)

    def resettle(self) -> None:
        """Collect and freeze the heap (service/heap.py), after start-up and after each activation. The
        thaw first lets the collection see the cycles of models retired since the last time."""
        if self.settings.gc_freeze:
            heap.thaw()
            heap.settle()

    def _queue_full_error(self) -> ServiceError:
        headers = {"Retry-After": str(self.settings.retry_after_s)}
        message = f"the request queue is full ({self.settings.max_queue_size} waiting); retry later"
        if self.settings.queue_full_status == 503:
            return ServiceUnavailable(message, code="queue_full", headers=headers)
        return QueueFull(message, headers=headers)

    # --- serving -----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def check_accepting(self) -> None:
        """503 unless requests are being admitted."""
        if self.phase is Phase.READY:
            return
        headers = {"Retry-After": str(self.settings.retry_after_s)}
        if self.phase is Phase.LOADING:
            raise ServiceUnavailable("the model is still loading", code="not_ready", headers=headers)
        if self.phase is Phase.FAILED:
            # Unauthenticated probes read this: the reason without paths or reprs (the log has all of it).
            detail = public_detail(RuntimeError(self.error)) if self.error else "unknown error"
            raise ServiceUnavailable(f"the model failed to load: {detail}; activate a working version through "
                                     "the admin API", code="load_failed")
        raise ServiceUnavailable("the server is shutting down", code="draining", headers=headers)

    def check_can_activate(self) -> None:
        """503 while loading or shutting down. After a failed load, activating another version is the way
        out (issue 17, M2), so it is allowed then."""
        if self.phase is not Phase.FAILED:
            self.check_accepting()

    def recovered(self) -> None:
        """An activation succeeded: a service whose own load had failed is ready now."""
        if self.phase is Phase.FAILED and self.registry.default_variant is not None:
            self.phase, self.error = Phase.READY, None
            self.metrics.model_ready.set(1)
            log.info("recovered: serving %s after a failed load", ", ".join(
                f"{s.variant}={s.info.model}:{s.info.version}" for s in self.registry.all()))

    # --- shutdown ----------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop admitting now (idempotent); queued and running requests continue."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.phase = Phase.DRAINING
            log.info("draining: no new requests admitted")
        self.metrics.model_ready.set(0)
        for served in self.registry.all():
            served.batcher.stop_accepting()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting, let admitted work finish within the timeout, then fail leftovers with 503.
        Concurrent and repeated calls share one drain."""
        self.begin_drain()
        if self._drain_task is None:
            budget = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
            self._drain_task = asyncio.create_task(self._drain(budget), name="drain")
        await asyncio.shield(self._drain_task)

    def hurry_drain(self) -> None:
        """End a running drain's wait now (a second SIGTERM/SIGINT): leftovers get 503 at once."""
        self._drain_deadline = 0.0

    async def _drain(self, timeout_s: float) -> None:
        self._drain_deadline = time.monotonic() + timeout_s
        while time.monotonic() < self._drain_deadline and any(s.batcher.busy for s in self.registry.all()):
            await asyncio.sleep(0.01)
        failed = 0
        for served in self.registry.all():
            failed += served.batcher.fail_all(
                lambda: ServiceUnavailable("the server shut down before this request completed",
                                           code="shutdown"))
            served.batcher.stop()
        if failed:
            log.warning("drain timeout (%.1fs): failed %d unfinished request(s) with 503", timeout_s, failed)
        else:
            log.info("drained")

    async def close(self) -> None:
        """Lifespan shutdown: drain (if not done yet), stop workers and background tasks."""
        await self.drain()
        # Workers finish their current batch and exit; wait briefly so that the interpreter does not
        # tear down torch under a running batch (a stuck one is a daemon and cannot block exit).
        for served in self.registry.all():
            await asyncio.to_thread(served.batcher.join, 2.0)
            await asyncio.to_thread(served.runner.close)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.preprocessor.close()
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPED

    async def _watch_loop_lag(self, interval_s: float = 0.5) -> None:
        gauge = self.metrics.event_loop_lag
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(interval_s)
            gauge.set(max(0.0, time.monotonic() - t0 - interval_s))
