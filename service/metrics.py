"""All Prometheus metrics of the service, with their bucket families (serving-conventions §8).

Names carry the `eas_` prefix, base units and `_total` on counters, and never a colon (colons belong to
recording rules, deploy/prometheus/rules/). Labels are low-cardinality only (`route`, `model`,
`variant`, `code`, `reason`, `status`, `result`, `outcome`, `traffic`, and `batch_size` as at most ten
classes). Every variant shares the same buckets so that `histogram_quantile` comparisons between `eas` and
`baseline` are valid. Each app owns its own
`CollectorRegistry` (several apps in one process, as in tests, must not collide).

docs/observability.md has the table of every family, what each phase histogram covers, and the rules and
dashboard built on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:  # type hints only: the batching layer imports nothing from here at run time
    from service.batching.work import Generation, WorkItem

# Dense where an attention-skipping speed-up shows (tens to hundreds of ms).
REQUEST_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
    10.0, 20.0, 30.0, 60.0,
)
# Queue waits, preprocessing and single model phases are often sub-millisecond.
QUEUE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
    5.0, 10.0, 30.0, 60.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
# Encoded images range from a few hundred bytes (small PNGs) to the body limit (16 MiB by default): powers
# of two from 256 B to 64 MiB, so a quantile lands within a factor of two of the real size. (Buckets that
# began at 16 KiB put every small image in the first bucket, whose p50 always interpolates to 8192 B.)
IMAGE_BYTES_BUCKETS: tuple[float, ...] = tuple(float(256 * 2**i) for i in range(19))  # 256 B .. 64 MiB
# Prompts: a few dozen tokens (the demo: 12 text + 64 image) to the model's positions (thousands); powers of
# two, so a reduction to a quarter of the image tokens moves the quantile by about two buckets.
PROMPT_TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(3, 16))  # 8 .. 32768
# Conversions take minutes to hours.
JOB_BUCKETS: tuple[float, ...] = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# The model phases a generation is split into (service/runner/phases.py says what each covers).
PHASES: tuple[str, ...] = ("vision_encoder", "prefill", "decode")

# `traffic` of a batch: `live` holds client requests only; `shadow` holds at least one mirrored request
# (service/shadow.py), which made the batch bigger than real traffic alone would have.
LIVE, SHADOW = "live", "shadow"


def batch_size_class(size: int) -> str:
    """The `batch_size` label of a batch: exact up to 4 (where most batches are), then power-of-two ranges
    "5-8", "9-16", ... "129-256": at most 10 values for the largest `EAS_MAX_BATCH_SIZE` (256)."""
    if size <= 4:
        return str(size)
    upper = 1 << (size - 1).bit_length()
    return f"{upper // 2 + 1}-{upper}"


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

        # --- requests (recorded by the middleware for /v1/ routes) -----------------------------------
        self.requests = Counter("eas_requests", "Inference requests answered, by status code.",
                                ("route", "model", "variant", "code"), registry=r)
        self.rejected = Counter("eas_requests_rejected", "Requests refused before or instead of inference.",
                                ("reason",), registry=r)
        # `code` lets latency rules keep fast refusals (429, 413, ...) out of the percentiles.
        self.request_duration = Histogram("eas_request_duration_seconds",
                                          "Server-side end-to-end request time.",
                                          ("route", "model", "variant", "code"), buckets=request_buckets,
                                          registry=r)

        # --- where a request's time goes (recorded per answered request) -----------------------------
        self.queue_duration = Histogram("eas_request_queue_duration_seconds",
                                        "Time from enqueue to the start of the request's batch.",
                                        mv, buckets=queue_buckets, registry=r)
        self.preprocess_duration = Histogram("eas_preprocess_duration_seconds",
                                             "Image decode plus processor (tokenise, resize) time.",
                                             mv, buckets=queue_buckets, registry=r)
        self.inference_duration = Histogram("eas_inference_duration_seconds",
                                            "Generation plus detokenisation time of the request's batch.",
                                            mv, buckets=request_buckets, registry=r)
        self.vision_encoder_duration = Histogram(
            "eas_vision_encoder_duration_seconds",
            "Vision tower plus projector forward of the request's batch (first forward pass only).",
            mv, buckets=queue_buckets, registry=r)
        self.prefill_duration = Histogram(
            "eas_prefill_duration_seconds",
            "Generation start to the end of the first forward pass (the first token), minus the vision "
            "encoder.", mv, buckets=queue_buckets, registry=r)
        self.decode_duration = Histogram(
            "eas_decode_duration_seconds",
            "End of the first forward pass to the end of generation (every later token).",
            mv, buckets=request_buckets, registry=r)
        # Streaming latency (issue 18): what a client of a streamed answer waits for.
        self.time_to_first_token = Histogram(
            "eas_time_to_first_token_seconds",
            "Request arrival to the request's first generated token existing on the server.",
            mv, buckets=request_buckets, registry=r)
        self.time_per_output_token = Histogram(
            "eas_time_per_output_token_seconds",
            "Mean time between a request's later tokens (requests of two or more tokens).",
            mv, buckets=queue_buckets, registry=r)
        self.generated_tokens = Counter("eas_generated_tokens", "Completion tokens returned to clients.",
                                        mv, registry=r)
        # What a visual-token reduction saves shows here, per variant (docs/conversion.md).
        self.prompt_tokens = Histogram(
            "eas_prompt_tokens", "Prompt tokens each request ran through the decoder (after visual-token "
            "reduction, where the variant has one).", mv, buckets=PROMPT_TOKEN_BUCKETS, registry=r)
        self._phase_histograms = {"vision_encoder": self.vision_encoder_duration,
                                  "prefill": self.prefill_duration, "decode": self.decode_duration}

        # The like-for-like comparison of the variants (docs/observability.md, "What the speedup compares"):
        # one observation per executed batch, so batches of different sizes are never mixed.
        self.batch_inference_duration = Histogram(
            "eas_batch_inference_duration_seconds",
            "Generation plus detokenisation time of each executed batch, by batch size (class) and traffic "
            "(live: client requests only; shadow: holds a mirrored request).",
            ("model", "variant", "batch_size", "traffic"), buckets=request_buckets, registry=r)

        # --- batching and load ------------------------------------------------------------------------
        self.batch_size = Histogram("eas_batch_size",
                                    "Requests per executed batch of live traffic (batches holding a mirrored "
                                    "request are left out).", mv, buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.image_bytes = Histogram("eas_image_bytes", "Size of the request's encoded image (as uploaded, "
                                     "after base64 decoding), in bytes.", mv, buckets=IMAGE_BYTES_BUCKETS,
                                     registry=r)
        self.queue_depth = Gauge("eas_queue_depth", "Requests admitted and not yet started.", mv, registry=r)
        self.queue_capacity = Gauge("eas_queue_capacity", "Queue size beyond which requests are refused.",
                                    mv, registry=r)
        self.in_flight = Gauge("eas_requests_in_flight", "Inference requests being handled.", registry=r)
        self.event_loop_lag = Gauge("eas_event_loop_lag_seconds",
                                    "How late the event loop ran a timer (healthy: < 0.01 s).", registry=r)

        # --- what is served ---------------------------------------------------------------------------
        self.model_info = Gauge("eas_model_info", "Served variants (value 1).",
                                ("model", "variant", "version", "kind", "dtype", "device", "skipped_layers"),
                                registry=r)
        self.model_ready = Gauge("eas_model_ready", "1 when every variant is loaded, warm and not draining.",
                                 registry=r)

        # --- shadow traffic (service/shadow.py) -------------------------------------------------------
        self.shadow_requests = Counter(
            "eas_shadow_requests", "Mirrored requests by outcome (completed, suspended, expired, failed).",
            ("model", "outcome"), registry=r)
        self.shadow_inference_duration = Histogram(
            "eas_shadow_inference_duration_seconds",
            "Generation plus detokenisation time of mirrored requests, by the variant that ran them.",
            mv, buckets=request_buckets, registry=r)
        self.shadow_agreement = Counter("eas_shadow_agreement", "Mirrored answers equal to the live one or not.",
                                        ("model", "result"), registry=r)

        # --- conversion jobs (service/admin/supervisor.py) ---------------------------------------------
        self.conversion_jobs = Counter("eas_conversion_jobs", "Conversion jobs that reached a final status.",
                                       ("status",), registry=r)
        self.conversion_job_duration = Histogram("eas_conversion_job_duration_seconds",
                                                 "Run time of finished conversion jobs (start to finish).",
                                                 ("status",), buckets=JOB_BUCKETS, registry=r)
        self.conversion_jobs_in_progress = Gauge("eas_conversion_jobs_in_progress",
                                                 "Conversion worker processes running now.", registry=r)

    def observe_generation(self, model: str, variant: str, generation: Generation) -> None:
        """One answered request's model-side time (the whole generation and the phases that were measured)
        and its token counts."""
        self.inference_duration.labels(model, variant).observe(generation.inference_s)
        for phase, seconds in generation.phases.items():
            self._phase_histograms[phase].labels(model, variant).observe(seconds)
        self.generated_tokens.labels(model, variant).inc(generation.completion_tokens)
        prompt = generation.decoder_prompt_tokens
        self.prompt_tokens.labels(model, variant).observe(generation.prompt_tokens if prompt is None else prompt)

    def observe_token_latency(self, model: str, variant: str, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.time_to_first_token.labels(model, variant).observe(max(0.0, ttft_s))
        if tpot_s is not None:
            self.time_per_output_token.labels(model, variant).observe(max(0.0, tpot_s))

    def batch_observer(self, model: str, variant: str) -> Callable[[list[WorkItem], list[Generation]], None]:
        """The batcher's per-batch callback for one variant (called on its worker thread, before the batch's
        requests are answered): the batch's model time by size and traffic, and the live batch sizes."""
        sizes = self.batch_size.labels(model, variant)

        def observe(items: list[WorkItem], generations: list[Generation]) -> None:
            mirrored = any(item.shadow for item in items)
            # Every row of a batch carries the batch's time; one observation per batch.
            self.batch_inference_duration.labels(
                model, variant, batch_size_class(len(items)), SHADOW if mirrored else LIVE,
            ).observe(generations[0].inference_s)
            if not mirrored:
                sizes.observe(len(items))

        return observe

    def observe_conversion_job(self, status: str, started_at: str | None, finished_at: str | None) -> None:
        """A job reached `status`; its run time is observed when it ever started (a queued job cancelled
        before it ran has none)."""
        self.conversion_jobs.labels(status).inc()
        start, end = _parse_utc(started_at), _parse_utc(finished_at)
        if start is not None and end is not None:
            self.conversion_job_duration.labels(status).observe(max(0.0, (end - start).total_seconds()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _parse_utc(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
