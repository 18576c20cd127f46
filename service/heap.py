"""Keep the cyclic garbage collector's full passes off the request path (docs/serving.md, "Garbage
collection").

A loaded server holds about half a million long-lived Python objects (torch, transformers, the processor,
FastAPI's routes). A full (generation 2) collection walks every one of them, holding the GIL: measured
200-300 ms on the 2-core machine, a stall of every request and probe in that process, and of every batch
in a model process. Such passes come whenever enough new objects have survived since the last one, so
under steady traffic they arrive at unpredictable moments.

`settle()` collects once, at a moment of our choosing (start-up, after an activation), then freezes
what is left: frozen objects are never walked again, so later passes only see what was allocated since.
Frozen objects are still freed by reference counting; only a reference cycle among them would outlive its
last reference, which is why `thaw()` comes before a model is retired: a loaded transformers model is
full of cycles (measured: one stays alive frozen even with the runner's forward hooks removed).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> float:
    """Collect everything now, then freeze the survivors; returns the seconds it took."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    seconds = time.perf_counter() - t0
    log.info("heap settled: %d objects frozen in %.0f ms", gc.get_freeze_count(), 1000 * seconds)
    return seconds


def thaw() -> None:
    """Make frozen objects collectable again (before dropping a model: its cycles must be seen)."""
    gc.unfreeze()
