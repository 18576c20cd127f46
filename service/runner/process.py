"""One variant's model in a process of its own (Settings.model_process; docs/serving.md, "The model process").

Why: in one process the event loop (HTTP, validation), the preprocessing threads and the batch worker's
Python between matrix multiplies all take turns on one interpreter lock. On the 2-core machine that lock,
not the cores, bounded throughput: at 16 clients eas-serve reached 0.73x LitServe, whose model runs in a
worker process of its own (issue 18). Here the parent keeps everything request-sized (HTTP, validation,
image decode, the processor) and the child only collates and runs batches, so the two run in parallel.

The contract between them is `ModelRunner.run_batch`, unchanged: `ProcessRunner` is a `ModelRunner` whose
`run_batch` ships the batch's rows to the child, which runs the same `ModelRunner.run_batch` on its own copy
of the model and sends back the `Generation`s. A lone request takes a shorter way (`submit`, called by the
Batcher on the event loop): the loop sends it and reads the reply itself, with no batch worker between
(`_LoopExchange`, which watches cancellations, streaming and a dead or stuck child as `_exchange` does).
Along the way:

- **Tensors travel as numpy arrays** (`to_wire` / `from_wire`): pickling torch tensors serialises each
  storage through torch.save, measured 7 ms + 9 ms for a batch of 16 prepared requests against 0.3 + 0.2 ms
  as numpy (bf16 travels as its int16 bit pattern).
- **Streaming**: the child's token sink sends `("delta", row, text)`; the parent hands it to the request's
  sink on the batch worker thread, as the in-process runner does (on the loop, for a batch sent from there).
- **Cancellation**: a shared array of one flag per batch row; a request's `cancelled` flag sets its row's at
  once (a hook on its CancelFlag; an Event without one is copied every CANCEL_POLL_S while the parent
  waits), and the child's rows read it at every decode step (of the per-step path: sampling, stop options,
  streaming; a plain greedy batch ends once all its rows are cancelled).
- **Threads**: the parent's `ThreadBudget` (which shrinks while conversion jobs run) goes with every batch.
- **Memory**: one copy of the weights for both processes. The parent moves its weights into an anonymous
  memory file that the child maps and adopts after its own load (service/runner/shared_weights.py), and
  uses them for an idle server's lone request (`run_here`, Settings.serve_lone_here), skipping the
  crossing. With that setting off, the parent's copy is released instead (moved to the meta device; the
  parent still needs the processor, the config and the plan).
- **Failure**: if the child dies, the batch it held fails (500, logged) and the next batch starts a new
  child; one still running a batch STUCK_GRACE_S after all its rows' deadlines is killed the same way.
  The child exits when the parent does, kill -9 included: its end of the socket closes, and a watchdog
  thread sees it re-parented even while it is loading or running a batch.
- **Start**: the child is forked by a fork server that has done the imports once (service/runner/forkserver.py;
  EAS_FORKSERVER), or else `python -m service.runner.process_main FD PID FLAGS_FD`; never a
  multiprocessing spawn, which would import the parent's `__main__` again in the child (a script that starts
  the server at its top level would start a second server there). It gets the parent's import path, and the
  rest over the socket.

Timings in a `Generation` (first-token times included) are `time.monotonic()` readings, which are one
clock for every process on Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from eas.model.loading import LoadedModel
from eas.model.token_reduction import token_reducer
from service import allocator, heap
from service.batching.work import Generation, Sampling
from service.runner.forkserver import ForkedProcess, fork_model_process
from service.runner.runner import ModelRunner, VariantInfo, warmup_image
from service.runner.shared_weights import SharedLayout, WeightsDiffer, adopt, share
from service.runner.threads import ThreadBudget

log = logging.getLogger(__name__)

# How often the waiting parent copies into the shared flags the cancellations of requests that cannot tell it
# themselves (a plain Event instead of a WorkItem's CancelFlag: warm-up, tests' stand-ins).
CANCEL_POLL_S = 0.01
# How often it looks at a batch whose every request tells it of its cancellation itself (CancelFlag hooks): only
# to notice a stuck child, so rarely. Each wake-up takes the interpreter lock from the event loop and the
# preprocessing threads (~6 per batch at 16 clients with CANCEL_POLL_S); the throughput gain of fewer of them
# was within this machine's spread when measured (docs/serving.md, "Peers").
WATCHED_POLL_S = 0.5
START_TIMEOUT_S = 600.0  # loading a large model from a slow disk
STOP_TIMEOUT_S = 5.0
STUCK_GRACE_S = 30.0
EXIT_WAIT_S = 0.5  # for the exit status of a child whose socket has closed (a failure path only)
# The largest batch the event loop sends itself (ProcessRunner.submit): far below the socket buffer, so that
# the write never waits for the child. A batch of one ordinary request is tens of KB.
LOOP_WRITE_LIMIT = 1 << 20


class ModelProcessError(RuntimeError):
    """The model process failed a batch, or is gone."""


class ModelProcessGone(ModelProcessError):
    """The model process is not there to run batches: it did not start, was stopped, died or was killed
    (not a batch that raised, which it reports and survives)."""


# --- the wire format -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Array:
    data: Any  # numpy array
    dtype: str  # the torch dtype's name


def to_wire(value: Any) -> Any:
    """`value` with every tensor replaced by a numpy array (BatchFeature, dict, list and tuple walked)."""
    if isinstance(value, torch.Tensor):
        # Only the operations a tensor needs: each torch call releases the interpreter lock, and the batch
        # worker that calls this competes for it with the event loop and the preprocessing threads, so each
        # release can cost it a switch interval (5 ms) before it runs again (docs/serving.md, "The model
        # process"). The processor's tensors need none of them.
        tensor = value
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits
            tensor = tensor.view(torch.int16)
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        return _Array(tensor.numpy(), dtype)
    if isinstance(value, BatchFeature):
        return ("__batch_feature__", {k: to_wire(v) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_wire(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Packed:
    """One request's features already in their wire form and pickled (`pack`)."""

    data: bytes


def pack(features: Any) -> Packed:
    """`features` serialised for the child, where the request is prepared (a preprocessing thread), so the
    batch worker only concatenates bytes when it sends a batch: to_wire and pickling of a batch of 8 were
    ~1.1 ms of the ~5-7 ms the child sat idle between two batches at 16 clients, the worker taking turns for
    the interpreter lock with the event loop and the preprocessing threads all along."""
    return Packed(pickle.dumps(to_wire(features), protocol=pickle.HIGHEST_PROTOCOL))


def unpack(features: Any) -> Any:
    """The child's side of `pack` (or of `to_wire`, for features that were not packed)."""
    if isinstance(features, Packed):
        features = pickle.loads(features.data)
    return from_wire(features)


def from_wire(value: Any) -> Any:
    if isinstance(value, _Array):
        tensor = torch.from_numpy(value.data)
        return tensor.view(torch.bfloat16) if value.dtype == "bfloat16" else tensor
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__batch_feature__":
        return BatchFeature({k: from_wire(v) for k, v in value[1].items()})
    if isinstance(value, dict):
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(from_wire(v) for v in value)
    return value


# Socket buffers large enough for a whole batch of prepared rows (a batch of 8 embedded-model rows is ~400 KB,
# over the default ~208 KB): a send is then one write that never waits for the reader (the kernel caps the
# request at net.core.wmem_max / rmem_max).
SOCKET_BUFFER_BYTES = 8 << 20
_FRAME_LIMIT = 0x7FFFFFFF  # Connection's 4-byte length header; larger messages take its own longer format


def _send(conn: Connection, message: Any) -> None:
    """`conn.send_bytes(pickle)` in one write: Connection writes the length and a large payload separately,
    and each write releases the interpreter lock, which the batch worker then waits to get back behind the
    event loop and the preprocessing threads (up to a switch interval each time: measured 4 ms per batch at
    16 clients). The frame is the one Connection.recv_bytes reads."""
    _write(conn, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _write(conn: Connection, payload: bytes) -> None:
    if len(payload) > _FRAME_LIMIT:
        conn.send_bytes(payload)
        return
    chunks = [struct.pack("!i", len(payload)), memoryview(payload)]
    fd = conn.fileno()
    while chunks:  # a blocking socket writes everything at once unless a signal interrupts it part-way
        written = os.writev(fd, chunks)
        while chunks and written >= len(chunks[0]):
            written -= len(chunks[0])
            chunks.pop(0)
        if chunks and written:
            chunks[0] = chunks[0][written:]


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """What the child needs of one WorkItem (the rest — futures, the event loop — stays in the parent)."""

    question: str
    max_new_tokens: int
    sampling: Sampling
    streamed: bool
    features: Any  # wire form of the processor's tensors, or None (then `image` is prepared in the child)
    image: Image.Image | None
    tokens: int


# --- the child -----------------------------------------------------------------------------------------

class _Flag:
    """A cancel flag backed by the shared array: what RowControl reads (`is_set`)."""

    def __init__(self, flags: Any, index: int) -> None:
        self._flags, self._index = flags, index

    def is_set(self) -> bool:
        return bool(self._flags[self._index])


@dataclasses.dataclass
class _ChildItem:
    """The WorkItem attributes ModelRunner.run_batch reads."""

    question: str
    max_new_tokens: int
    sampling: Sampling
    sink: Callable[[str], None] | None
    cancelled: Any  # _Flag in the child; an Event for the parent's warm-up row
    features: Any
    image: Image.Image | None
    tokens: int


def child_main(conn: Connection, flags_fd: int) -> None:
    """The model process (started by service/runner/process_main.py or forked by service/runner/forkserver.py):
    load, say ready, then run batches until told to stop or the parent is gone. `flags_fd` is the cancel flags'
    memory, which the parent sized (the first message)."""
    try:
        weights_fd = _receive_weights(conn)
        rows, loader, info, settings, layout = _recv(conn)
        if settings.malloc_reuse:  # before the load: its own allocations are the first to reuse memory
            allocator.keep_freed_memory()
        flags = mmap.mmap(flags_fd, rows)
        model = loader(info, settings)
        shared = 0
        if weights_fd is not None:
            try:
                differing = adopt(model.model, weights_fd, layout)
                shared = layout.size
                if differing:
                    log.warning("the model process's own load differed from the server's in %d parameters "
                                "(first: %s); both now use the server's", len(differing), differing[0])
            except WeightsDiffer as exc:  # then every request comes here (ProcessRunner.run_here)
                log.warning("the model process keeps its own weights: %s", exc)
            finally:
                os.close(weights_fd)
        budget = ThreadBudget(threads=settings.inference_threads)
        runner = ModelRunner(model, info, budget)
        _send(conn, ("ready", shared))
        settled = False  # service/heap.py
    except BaseException:
        with contextlib.suppress(OSError):
            _send(conn, ("error", traceback.format_exc(limit=8)))
        return
    while True:
        try:
            message = _recv(conn)
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] == "stop":
            return
        _, specs, threads = message
        budget.full = threads
        items = [_child_item(conn, flags, k, spec) for k, spec in enumerate(specs)]
        try:
            generations = runner.run_batch(items)  # type: ignore[arg-type]
            reducer = token_reducer(model.model)  # what /info shows of a visual-token reduction
            reply: tuple[Any, ...] = ("done", generations,
                                      reducer.last_prompt_tokens if reducer is not None else None)
        except Exception:
            reply = ("error", traceback.format_exc(limit=8))
        if settings.gc_freeze and not settled:
            # After the first batch (the warm-up), before its reply: the model and what its first run built
            # lazily are all there now, and nobody's request waits on this one full collection.
            heap.settle()
            settled = True
        try:
            _send(conn, reply)
        except OSError:
            return


def _receive_weights(conn: Connection) -> int | None:
    """The first byte the parent sends: b"W" with the shared weights' file descriptor, or b"N" without."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        tag, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if tag != b"W" or not fds:
        for fd in fds:
            os.close(fd)
        return None
    return fds[0]


def _child_item(conn: Connection, flags: Any, k: int, spec: RowSpec) -> _ChildItem:
    def sink(delta: str) -> None:
        _send(conn, ("delta", k, delta))

    features = unpack(spec.features) if spec.features is not None else None
    return _ChildItem(spec.question, spec.max_new_tokens, spec.sampling, sink if spec.streamed else None,
                      _Flag(flags, k), features, spec.image, spec.tokens)


# --- the parent ----------------------------------------------------------------------------------------

def _socket_pair() -> tuple[socket.socket, int]:
    """The parent's end of a new socket pair, and the child's as a bare descriptor (the caller closes it once
    the child holds its own copy)."""
    ours, theirs = socket.socketpair()
    for end in (ours, theirs):
        with contextlib.suppress(OSError):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    return ours, theirs.detach()


def _wire(features: Any) -> Any:
    return features if isinstance(features, Packed) else to_wire(features)


class ProcessRunner(ModelRunner):
    """A ModelRunner whose batches run in a child process holding its own copy of the model."""

    pack = staticmethod(pack)  # what the preprocessing does to a request's features for this runner
    on_sent: Callable[[], None] | None = None  # called on the worker once its batch is sent (the Batcher's flush)

    def __init__(self, model: LoadedModel, info: VariantInfo, threads: ThreadBudget, *,
                 loader: Callable[..., LoadedModel], settings: Any, max_rows: int) -> None:
        super().__init__(model, info, threads)
        self._device, self._dtype = str(model.device), str(model.dtype).removeprefix("torch.")
        # One copy of the weights for both processes (shared_weights.py), or else the parent keeps only the
        # processor, config and plan.
        self._weights: tuple[int, SharedLayout] | None = None
        if getattr(settings, "serve_lone_here", False) and model.device.type == "cpu":
            try:
                self._weights = share(model.model)
            except Exception:
                log.warning("variant %s: could not share the weights with the model process", info.variant,
                            exc_info=True)
        self.shared_bytes = 0  # what the current child adopted (0: it holds its own copy)
        if self._weights is None:
            try:
                model.model.to("meta")
            except Exception:  # a model that cannot move keeps its weights here: memory, not correctness
                log.warning("variant %s: could not release the parent's copy of the weights", info.variant,
                            exc_info=True)
        self._loader = loader
        # The parent has just verified the files; the child need not hash them again.
        self._child_info = dataclasses.replace(info, verified=True)
        self._settings = settings
        self._rows = max(1, max_rows)
        # One cancel flag per batch row, in memory both processes map (an anonymous file handed to the child).
        self._flags_fd = os.memfd_create("eas-cancel-flags")
        os.ftruncate(self._flags_fd, self._rows)
        self._flags = mmap.mmap(self._flags_fd, self._rows)
        # Each batch's number: a cancellation hook of an earlier batch that fires late leaves this one's rows alone.
        self._flags_lock = threading.Lock()
        self._serial = 0
        self._lock = threading.Lock()  # one batch at a time (the batcher's worker; warm-up before it starts)
        self._process: subprocess.Popen[bytes] | ForkedProcess | None = None
        self._conn: Connection | None = None
        self._closed = False
        self.restarts = 0
        self._ready = False
        self._started_at = 0.0
        with self._lock:
            self._start()  # loads while the caller does other work; the first batch waits for it

    @property
    def device(self) -> str:
        return self._device

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def pid(self) -> int | None:
        """The model process's pid (None when there is none right now)."""
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        """Start a child and send it what to load; `_await_ready` waits for it (so several variants' children
        can load side by side)."""
        process: subprocess.Popen[bytes] | ForkedProcess | None = None
        if getattr(self._settings, "forkserver", True):
            ours, child_fd = _socket_pair()
            try:
                process = fork_model_process(child_fd, self._flags_fd)
            finally:
                os.close(child_fd)
            if process is None:  # a fork server that failed may still have forked a holder of that socket
                ours.close()
        if process is None:
            ours, child_fd = _socket_pair()
            try:
                # The parent's import path, so the child finds this package and the loader the parent names.
                path = os.pathsep.join(p or os.getcwd() for p in sys.path)
                process = subprocess.Popen([sys.executable, "-m", "service.runner.process_main", str(child_fd),
                                            str(os.getpid()), str(self._flags_fd)],
                                           pass_fds=(child_fd, self._flags_fd),
                                           env={**os.environ, "PYTHONPATH": path})
            except BaseException:
                ours.close()
                raise
            finally:
                os.close(child_fd)
        try:
            if self._weights is not None:
                socket.send_fds(ours, [b"W"], [self._weights[0]])
            else:
                ours.sendall(b"N")
        except BaseException:
            ours.close()
            process.kill()
            raise
        conn = Connection(ours.detach())
        self._process, self._conn, self._started_at = process, conn, time.perf_counter()
        layout = self._weights[1] if self._weights is not None else None
        try:
            _send(conn, (self._rows, self._loader, self._child_info, self._settings, layout))
        except BaseException:
            self._kill()
            raise
        self._ready = False

    def _await_ready(self) -> None:
        process, conn = self._process, self._conn
        assert process is not None and conn is not None
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise ModelProcessGone(f"the model process did not start within {START_TIMEOUT_S:.0f}s")
            message = _recv(conn)
        except (EOFError, OSError):
            code = process.poll()
            self._kill()
            raise ModelProcessGone(f"the model process exited while loading (exit code {code})") from None
        except BaseException:
            self._kill()
            raise
        if message[0] != "ready":
            self._kill()
            raise ModelProcessGone(f"the model process failed to load:\n{message[1]}")
        self.shared_bytes = message[1]
        self._ready = True
        log.info("variant %s: model process %d ready in %.2fs", self.info.variant, process.pid,
                 time.perf_counter() - self._started_at)

    def run_batch(self, items: list[Any]) -> list[Generation]:
        with self._lock:
            if self._closed:
                raise ModelProcessGone("the model process was stopped")
            if self._process is None or self._process.poll() is not None:
                self._sent()  # a start takes seconds: the batch before is not held back for it
                self.restarts += 1
                log.warning("variant %s: starting a new model process (restart %d)", self.info.variant,
                            self.restarts)
                self._kill()
                self._start()
            if not self._ready:
                self._await_ready()
            return self._exchange(items)

    def _batch_message(self, items: list[Any]) -> bytes:
        with self._flags_lock:
            self._serial += 1
            for k in range(len(items)):
                self._flags[k] = False
        specs = [RowSpec(i.question, i.max_new_tokens, i.sampling, i.sink is not None,
                         _wire(i.features) if i.features is not None else None,
                         i.image if i.features is None else None, i.tokens) for i in items]
        return pickle.dumps(("batch", specs, self.threads.threads), protocol=pickle.HIGHEST_PROTOCOL)

    def _watch(self, items: list[Any]) -> tuple[list[tuple[Any, Callable[[], None]]], bool]:
        """Hook each request's cancel flag to its row's (after `_batch_message`); returns what `_unwatch` takes
        and whether every request's cancellation now reaches the child by itself."""
        serial, watched = self._serial, []
        for k, item in enumerate(items):
            watch = getattr(item.cancelled, "watch", None)
            if watch is None:
                continue

            def hook(k: int = k) -> None:
                with self._flags_lock:
                    if self._serial == serial and not self._flags.closed:
                        self._flags[k] = True

            watch(hook)
            watched.append((item.cancelled, hook))
        return watched, len(watched) == len(items)

    @staticmethod
    def _unwatch(watched: list[tuple[Any, Callable[[], None]]]) -> None:
        for flag, hook in watched:
            flag.unwatch(hook)

    def _copy_cancellations(self, items: list[Any]) -> None:
        """For requests whose cancellation does not reach the child by itself (`_watch`)."""
        for k, item in enumerate(items):
            if item.cancelled.is_set():
                self._flags[k] = True

    def _on_message(self, items: list[Any], message: tuple[Any, ...]) -> list[Generation] | None:
        """One message of the child about a batch: a streamed delta (None: more to come), its generations, or
        ModelProcessError (the batch failed in the child, which lives on) or ModelProcessGone (a sink raised:
        the child, which would go on and send this batch's reply to the next one, is stopped with it)."""
        if message[0] == "delta":
            sink = items[message[1]].sink
            if sink is not None:
                try:
                    sink(message[2])
                except Exception as exc:
                    self._kill()
                    raise ModelProcessGone(f"a streamed request's sink failed ({exc!r}); the model process was "
                                           "stopped with its batch") from exc
            return None
        if message[0] == "done":
            reducer = token_reducer(self.model.model)
            if reducer is not None and message[2] is not None:
                reducer.last_prompt_tokens = message[2]  # the child's, for /info
            return list(message[1])
        raise ModelProcessError(f"the model process failed the batch:\n{message[1]}")

    def _sent(self) -> None:
        """The worker's batch is in the child (or waits for it to start): the Batcher resolves the batch before
        it now (`Batcher.flush_deferred`, set as `on_sent`), while the child works."""
        if self.on_sent is not None:
            self.on_sent()

    def _gone(self) -> ModelProcessGone:
        """The child died during a batch (its end of the socket closed)."""
        code = None
        if self._process is not None:
            # Its socket closes while it exits, a moment before its exit status exists: wait that moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(EXIT_WAIT_S)
        return ModelProcessGone(f"the model process exited during a batch (exit code {code}); the next batch "
                                "starts a new one")

    def _exchange(self, items: list[Any]) -> list[Generation]:
        conn = self._conn
        assert conn is not None
        stuck_at = _stuck_at(items)
        payload = self._batch_message(items)
        watched, pushed = self._watch(items)
        poll_s = WATCHED_POLL_S if pushed else CANCEL_POLL_S
        try:
            _write(conn, payload)
            self._sent()
            while True:
                if not pushed:
                    self._copy_cancellations(items)
                if not conn.poll(poll_s):
                    if self._process is None or self._process.poll() is not None:
                        raise EOFError
                    if time.monotonic() > stuck_at:
                        self._kill()
                        raise _stuck()
                    continue
                generations = self._on_message(items, _recv(conn))
                if generations is not None:
                    return generations
        except (EOFError, OSError):
            gone = self._gone()
            self._kill()
            raise gone from None
        finally:
            self._unwatch(watched)

    def submit(self, items: list[Any], done: Callable[[list[Generation] | BaseException], None]) -> bool:
        """The Batcher's `submit`, on the event loop: send a batch and return at once; `done` gets its
        generations, or the exception that failed it, on the loop (`_LoopExchange`). False, with nothing
        sent, when the child is running the worker's batch, must be started first (the worker's `run_batch`
        does that), or the batch is too large to write without waiting (LOOP_WRITE_LIMIT)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            process, conn = self._process, self._conn
            if self._closed or not self._ready or process is None or conn is None or process.poll() is not None:
                self._lock.release()
                return False
            payload = self._batch_message(items)
        except BaseException:
            self._lock.release()
            raise
        if len(payload) > LOOP_WRITE_LIMIT:
            self._lock.release()
            return False
        try:
            _write(conn, payload)
            _LoopExchange(self, conn, items, done, asyncio.get_running_loop())
        except BaseException:
            # The child may hold part or all of the batch, and nobody would read its reply: it goes, and the
            # worker, which runs the batch instead, starts a new one.
            log.warning("variant %s: sending a batch from the event loop failed", self.info.variant, exc_info=True)
            self._kill()
            self._lock.release()
            return False
        return True

    @property
    def serves_here(self) -> bool:
        """Does this process hold the weights (shared with the child) to run a lone request itself?"""
        return self._weights is not None

    def run_here(self, items: list[Any]) -> list[Generation]:
        """The Batcher's `run_here`: a batch (an idle server's lone request) run in this process, on the weights
        it shares with the child; the child stays free for the next batch."""
        if not self.shared_bytes:  # the child holds other weights (WeightsDiffer): the answer must be its
            return self.run_batch(items)
        for item in items:
            if isinstance(item.features, Packed):
                item.features = unpack(item.features)
        return super().run_batch(items)

    def warm_up(self, max_new_tokens: int) -> Generation:
        """One real generation through the child (it also proves the pipe works)."""
        item = _ChildItem("what colour is the shape?", max_new_tokens, Sampling(), None, threading.Event(),
                          None, warmup_image(), 0)
        if self.serves_here:  # and this process's own first run, which lone requests take
            super().warm_up(max_new_tokens)
        return self.run_batch([item])[0]

    def close(self) -> None:
        """Stop the child: after the batch it is running, or by force after STOP_TIMEOUT_S."""
        acquired = self._lock.acquire(timeout=STOP_TIMEOUT_S)
        try:
            self._closed = True
            if self._conn is not None and acquired:
                with contextlib.suppress(OSError):
                    _send(self._conn, ("stop",))
            if self._process is not None and acquired:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(STOP_TIMEOUT_S)
            self._kill()
            if acquired and not self._flags.closed:
                with self._flags_lock:  # a late cancellation hook must not write into a closed map
                    self._flags.close()
                os.close(self._flags_fd)
                if self._weights is not None:  # the mapping itself lives as long as the model
                    os.close(self._weights[0])
                    self._weights = None
        finally:
            if acquired:
                self._lock.release()

    def _kill(self) -> None:
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT_S)


def _stuck() -> ModelProcessGone:
    return ModelProcessGone(f"the model process ran a batch {STUCK_GRACE_S:g}s past its last deadline and was "
                            "killed; the next batch starts a new one")


def _stuck_at(items: list[Any]) -> float:
    """When a batch's child counts as stuck: every row's deadline past (its flag set, so the child should have
    stopped it at its next step) and STUCK_GRACE_S more; it is then stuck in one step (a hung kernel, a
    deadlock) and is killed, which a worker thread could never be. Rows without a deadline (warm-up) give it
    START_TIMEOUT_S."""
    now = time.monotonic()
    return max(getattr(i, "deadline", now + START_TIMEOUT_S) for i in items) + STUCK_GRACE_S


class _LoopExchange:
    """One batch sent from the event loop (ProcessRunner.submit), watched there as `_exchange` watches a batch
    on the worker: the reply is read when the socket is readable, streamed deltas go to their sinks, each
    request's cancellation reaches the child (at once through its CancelFlag, else by polling every
    CANCEL_POLL_S), and a stuck or dead child is killed.
    The runner's lock, taken by `submit`, is held until the batch is over."""

    def __init__(self, runner: ProcessRunner, conn: Connection, items: list[Any],
                 done: Callable[[list[Generation] | BaseException], None], loop: asyncio.AbstractEventLoop) -> None:
        self.runner, self.conn, self.items, self.done, self.loop = runner, conn, items, done, loop
        self.stuck_at = _stuck_at(items)
        self.over = False
        self.watched, self.pushed = runner._watch(items)
        self.poll_s = WATCHED_POLL_S if self.pushed else CANCEL_POLL_S
        self.fd = conn.fileno()
        try:
            loop.add_reader(self.fd, self._readable)
        except BaseException:
            runner._unwatch(self.watched)
            raise
        self.timer = loop.call_later(self.poll_s, self._tick)

    def _readable(self) -> None:
        try:
            while not self.over and self.conn.poll(0):
                generations = self.runner._on_message(self.items, _recv(self.conn))
                if generations is not None:
                    self._end(generations)
        except ModelProcessError as exc:  # the child failed the batch, or a sink raised (the child is stopped)
            self._end(exc)
        except (EOFError, OSError):
            self._end(self.runner._gone(), kill=True)
        except Exception as exc:  # a reply that does not unpickle: the stream's state is unknown
            self._end(ModelProcessError(f"reading the model process's reply failed: {exc!r}"), kill=True)

    def _tick(self) -> None:
        if self.over:
            return
        if self.runner._conn is not self.conn:  # closed by `close` after its wait for the lock ran out
            self._end(ModelProcessGone("the model process was stopped during a batch"))
            return
        if not self.pushed:
            self.runner._copy_cancellations(self.items)
        if time.monotonic() > self.stuck_at:
            self._end(_stuck(), kill=True)
            return
        self.timer = self.loop.call_later(self.poll_s, self._tick)

    def _end(self, outcome: list[Generation] | BaseException, *, kill: bool = False) -> None:
        if self.over:
            return
        self.over = True
        self.timer.cancel()
        self.runner._unwatch(self.watched)
        with contextlib.suppress(OSError, ValueError):  # the fd may already be closed (`close`)
            self.loop.remove_reader(self.fd)
        if kill and self.runner._conn is self.conn:
            self.runner._kill()
        self.runner._lock.release()
        self.done(outcome)
