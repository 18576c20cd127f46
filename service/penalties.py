"""Client error budgets: an address that keeps sending refused requests is slowed down (issue 17).

Every refusal costs the server something (reading a 14 MB body to find it too complex, parsing 16 KiB of
headers, decoding an image to count its tokens), and a client that loops on them takes that share of the
CPU from everyone else. Each client address has a token bucket: a 4xx answer (or a connection refused with
431/408) takes a token, plus one per MiB of request body read for it; tokens come back at `rate_per_s` up
to `burst`. With the bucket empty, the address's next requests are not read at all: each waits `delay_s`
(holding nothing but its connection) and gets 429 `too_many_errors` with `Retry-After`, and the connection
is closed. A client whose requests succeed never notices; one that errs now and then neither (the defaults
allow a burst of 30 and 5 a second after it).

The address is the one the app sees (`scope["client"]`: the peer, or the `X-Forwarded-For` client when
uvicorn trusts the proxy that sent it); health probes are never refused here.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

MIB = 1024 * 1024
# The 429 a spent client gets, from the app (service/middleware.py) or the connection layer (service/server.py).
SPENT_CODE = "too_many_errors"
SPENT_MESSAGE = "too many refused requests from this client; retry after the time in Retry-After"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class ClientPenalties:
    def __init__(self, burst: int, rate_per_s: float, delay_s: float, *, max_clients: int = 65_536) -> None:
        self.burst = burst
        self.rate_per_s = rate_per_s
        self.delay_s = delay_s
        self.max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # charged from the event loop; read by tests and metrics elsewhere

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def charge(self, client: str | None, now: float | None = None, *, body_bytes: int = 0) -> None:
        """One refused request from `client`: a token, and one more per MiB of body the server had read for
        it, whole MiB (a refused 14 MB body costs what 14 small refusals do)."""
        if not self.enabled or client is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._refilled(client, now)
            bucket.tokens = max(0.0, bucket.tokens - 1.0 - body_bytes // MIB)
            if len(self._buckets) > self.max_clients:
                self._forget_full(now)

    def retry_after(self, client: str | None, now: float | None = None) -> float | None:
        """Seconds until `client` may send again, or None when it has tokens left."""
        if not self.enabled or client is None:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                return None
            bucket = self._refilled(client, now)
            if bucket.tokens >= 1.0:
                return None
            return (1.0 - bucket.tokens) / self.rate_per_s if self.rate_per_s > 0 else math.inf

    def _refilled(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
        return bucket

    def _forget_full(self, now: float) -> None:
        """Bound the table: drop clients whose buckets have refilled (they are as if never seen)."""
        for client in [c for c, b in self._buckets.items()
                       if b.tokens + (now - b.updated) * self.rate_per_s >= self.burst]:
            del self._buckets[client]


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "3600"
