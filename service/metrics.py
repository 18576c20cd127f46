"""All Prometheus metrics of the service, with their bucket families (serving-conventions §8).

Names carry the `eas_` prefix, base units and `_total` on counters; labels are low-cardinality only
(`route`, `model`, `variant`, `code`, `reason`). Every variant shares the same buckets so that
`histogram_quantile` comparisons between `eas` and `baseline` are valid. Each app owns its own
`CollectorRegistry` (several apps in one process, as in tests, must not collide); later issues add
metrics here, next to these.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Dense where an attention-skipping speed-up shows (tens to hundreds of ms).
REQUEST_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
    10.0, 20.0, 30.0, 60.0,
)
# Queue waits and preprocessing are often sub-millisecond.
QUEUE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
    5.0, 10.0, 30.0, 60.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
IMAGE_BYTES_BUCKETS: tuple[float, ...] = tuple(16 * 1024 * 4**i for i in range(7))  # 16 KiB .. 64 MiB
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metric families, registered in a private registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        request_buckets: Sequence[float] = REQUEST_BUCKETS,
        queue_buckets: Sequence[float] = QUEUE_BUCKETS,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
        mv = ("model", "variant")
        self.requests = Counter("eas_requests", "Inference requests answered, by status code.",
                                ("route", "model", "variant", "code"), registry=r)
        self.rejected = Counter("eas_requests_rejected", "Requests refused before or instead of inference.",
                                ("reason",), registry=r)
        self.request_duration = Histogram("eas_request_duration_seconds",
                                          "Server-side end-to-end request time.",
                                          ("route", "model", "variant"), buckets=request_buckets, registry=r)
        self.queue_duration = Histogram("eas_request_queue_duration_seconds",
                                        "Time from admission to the start of the request's batch.",
                                        mv, buckets=queue_buckets, registry=r)
        self.preprocess_duration = Histogram("eas_preprocess_duration_seconds",
                                             "Image decode plus processor (tokenise, resize) time.",
                                             mv, buckets=queue_buckets, registry=r)
        self.inference_duration = Histogram("eas_inference_duration_seconds",
                                            "Generation plus decode time of the request's batch.",
                                            mv, buckets=request_buckets, registry=r)
        self.batch_size = Histogram("eas_batch_size", "Requests per executed batch.", mv,
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.image_bytes = Histogram("eas_image_bytes", "Encoded image size.", mv,
                                     buckets=IMAGE_BYTES_BUCKETS, registry=r)
        self.queue_depth = Gauge("eas_queue_depth", "Requests admitted and not yet started.", mv, registry=r)
        self.in_flight = Gauge("eas_requests_in_flight", "Inference requests being handled.", registry=r)
        self.event_loop_lag = Gauge("eas_event_loop_lag_seconds",
                                    "How late the event loop ran a timer (healthy: < 0.01 s).", registry=r)
        self.model_info = Gauge("eas_model_info", "Served variants (value 1).",
                                ("model", "variant", "version", "kind", "dtype", "device"), registry=r)
        self.model_ready = Gauge("eas_model_ready", "1 when every variant is loaded, warm and not draining.",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
