"""The C allocator of the server's processes: freed memory kept for reuse, and given back on demand
(docs/serving.md, "Memory reuse").

Why. glibc's malloc serves a block of 128 KiB or more with a fresh `mmap` and unmaps it on free; after the
first such free it raises that threshold to the freed size, but it also returns the top of the heap to the
system whenever more than twice that lies free there. A batch's activations are megabytes each (a batch of
8 on the embedded model: 1.3 MB per [8, 80, 512] tensor), allocated and freed at every layer, so with the
defaults each batch faulted its working set back in page by page: ~3,700 minor page faults per batch of 8,
each a trip through the hypervisor on a VM. Measured in process, two model processes alternating (one torch
thread): a batch of 8 took 0.84x the time with the thresholds below (31.1 against 38.4 ms, paired range
0.69-0.88x), a batch of 4 and a lone request the same as before (they fault little either way).

`keep_freed_memory` serves blocks below 32 MiB (glibc's ceiling on 64-bit) from the heap and keeps up to
64 MiB free at the top of each arena, so a batch reuses the pages of the last one. The price is that memory
freed by a burst stays with the process until `trim`, which the large-image lane calls once its flood
is over (service/preprocess.py). Blocks of 32 MiB and more (a 7B model's activations at a large batch) are
mapped and unmapped as before. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the most glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and what it forks from now on); True when
    both took. Idempotent."""
    if _LIBC is None:
        return False
    done = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        log.warning("glibc refused the malloc thresholds; freed memory goes back to the system as before")
    return done


def trim() -> None:
    """Give the free memory of every arena back to the system (glibc's malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only
    except OSError:
        return None


_LIBC = _load_libc()
GLIBC = _LIBC is not None  # where both functions above do something
