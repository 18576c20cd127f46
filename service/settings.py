"""Every knob of the HTTP service, in one place, read from `EAS_*` environment variables.

`Settings()` with no environment is a working configuration (`uvicorn --factory service.app:create_app`
starts with it); tests and benchmarks build `Settings(...)` explicitly instead of touching the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EAS_", extra="ignore", protected_namespaces=())

    # --- what to serve -------------------------------------------------------------------------------
    model_store: Path = Field(Path("var/store"), description="Model store root (EAS_MODEL_STORE).")
    model: str | None = Field(None, description="Model name in the store; default: the store's default.")
    model_path: Path | None = Field(
        None, description="Serve this directory, bypassing the store (tests, benchmarks): as variant `eas` if it "
                          "is EAS-converted, else as `baseline` (service/runner/resolve.py)."
    )
    baseline_path: Path | None = Field(
        None, description="With EAS_MODEL_PATH: serve this directory as variant `baseline`."
    )
    load_baseline: bool = Field(True, description="Also serve the unskipped parent of a converted model.")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    # --- dynamic batching and queueing (serving-conventions §4) ---------------------------------------
    max_batch_size: int = Field(16, ge=1, le=256)
    max_batch_wait_ms: float = Field(5.0, ge=0, description="How long a batch's first request may wait.")
    max_queue_size: int = Field(128, ge=1, description="Admitted-but-not-started requests per variant.")
    queue_full_status: Literal[429, 503] = 429
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429/503.")
    default_deadline_ms: int = Field(30_000, ge=1)
    max_deadline_ms: int = Field(120_000, ge=1, description="Upper bound for X-Request-Deadline-Ms.")

    # --- input limits (serving-conventions §3) --------------------------------------------------------
    # Sized for a large photo after base64 (+33%): TGI's 2 MB default is a known trap (TGI #1802).
    max_body_bytes: int = Field(16 * MiB, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Decompression-bomb guard (w * h).")
    max_image_side: int = Field(8192, ge=1)
    allowed_image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP"], description="Pillow format names, comma separated."
    )
    max_question_chars: int = Field(1000, ge=1)
    default_max_new_tokens: int = Field(8, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="Cap on max_new_tokens / max_tokens per request.")

    # --- auth (serving-conventions §7) ----------------------------------------------------------------
    api_token: SecretStr | None = Field(None, description="Bearer token for inference routes and /metrics.")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin routes (none: disabled).")

    # --- shadow traffic (docs/observability.md) --------------------------------------------------------
    shadow_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Fraction of answered `eas` requests mirrored to `baseline` in the background (0: off).",
    )
    shadow_max_queue_depth: int = Field(
        4, ge=0, description="Mirroring is suspended while the baseline queue holds this many requests.",
    )

    # --- inference threads (issue 18; service/cpu.py) -------------------------------------------------
    inference_threads: int = Field(
        0, ge=0, description="Intra-op threads of inference (EAS_INFERENCE_THREADS); 0 = OMP_NUM_THREADS if set, "
                             "else the CPUs the process may use (affinity and cgroup quota, not the host's cores) "
                             "less one, which the event loop and preprocessing keep (service/cpu.py).",
    )

    gc_freeze: bool = Field(
        True, description="After start-up and after each activation, collect garbage once and freeze what "
                          "survives, so later full collections do not walk the loaded model's objects (a "
                          "200-300 ms stall each; service/heap.py). EAS_GC_FREEZE.",
    )
    malloc_reuse: bool = Field(
        True, description="Keep freed memory in the server's processes for reuse: glibc's mmap threshold raised "
                          "to 32 MiB and its trim threshold to 64 MiB, so that each batch reuses the last one's "
                          "pages instead of faulting them in afresh (a batch of 8 on the embedded model: 0.84x "
                          "the time). EAS_MALLOC_REUSE; service/allocator.py.",
    )
    model_process: bool | None = Field(
        None, description="Run each variant's model in a process of its own, beside the HTTP process "
                          "(EAS_MODEL_PROCESS; service/runner/process.py); unset: on when the model runs on the "
                          "CPU with the service's own loader.",
    )
    forkserver: bool = Field(
        True, description="Fork model processes and conversion workers from a process that has imported torch, "
                          "transformers and the project once (EAS_FORKSERVER; service/runner/forkserver.py): a "
                          "restart, a hot activation, a second variant or a job skips the ~5 s of imports (it "
                          "costs an idle process of ~350 MB, about half of it shared with the processes it "
                          "forks); off: each of them starts afresh.",
    )
    serve_lone_here: bool = Field(
        True, description="With a model process on the CPU, a request that finds its variant idle runs in the "
                          "HTTP process, on the weights it shares with the model process (one copy in memory); "
                          "batches, and requests that arrive meanwhile, go to the model process "
                          "(EAS_SERVE_LONE_HERE; service/runner/shared_weights.py).",
    )
    dispatch_from_loop: bool = Field(
        True, description="With a model process, a request that finds its variant idle (nothing queued, "
                          "admitted or running) is sent to the model process by the event loop itself, without "
                          "the batch worker's two thread hand-offs (EAS_DISPATCH_FROM_LOOP; "
                          "service/batching/batcher.py).",
    )

    decode_loop: Literal["auto", "eas", "transformers"] = Field(
        "auto", description="Which decode loop generation runs (EAS_DECODE_LOOP): `eas` is the project's own "
                            "(eas/model/decoding.py: transformers' greedy loop with the per-call set-up done once "
                            "per model, exact), `transformers` is `model.generate`, `auto` is `eas` on the CPU "
                            "(where it was measured) and `transformers` on a GPU. Options the project's loop does "
                            "not run (beams, for one) always go to `model.generate`.",
    )

    # --- following the registry's active version (issue 16; service/runner/follower.py) --------------
    # The registry itself is chosen by EAS_REGISTRY_URL, which the store reads (model_store/registry.py), so
    # the server, its conversion workers and the CLI all open the same one.
    follow_active: bool | None = Field(
        None, description="Poll the registry and hot-swap to the served model's active version when another "
                          "process moved it (EAS_FOLLOW_ACTIVE); unset: on exactly when EAS_REGISTRY_URL names "
                          "a PostgreSQL registry.",
    )
    follow_interval_s: float = Field(
        1.0, gt=0, le=300, description="Seconds between two looks at the registry (EAS_FOLLOW_INTERVAL_S): the "
                                       "bound on how late a replica notices an activation.",
    )

    # --- conversion jobs (docs/admin.md) --------------------------------------------------------------
    # The supervisor hands these to each worker on its command line (service/admin/supervisor.py); the worker
    # itself reads no environment.
    job_nice: int = Field(10, ge=0, le=19, description="Niceness of a conversion worker (EAS_JOB_NICE).")
    job_threads: int = Field(
        0, ge=0, description="Torch threads of a conversion worker (EAS_JOB_THREADS); 0 = all cores but one. The "
                             "server's inference threads shrink by as many while it runs (service/runner/threads.py).",
    )
    job_pin: bool = Field(True, description="Pin a conversion worker to the last cores (EAS_JOB_PIN).")
    job_ttl_s: float = Field(
        24 * 3600.0, gt=0, description="A finished job is deleted this long after it finished (EAS_JOB_TTL_S); "
                                       "BentoML keeps finished tasks 24 h (serving-conventions §6).",
    )

    # --- hardening: cost and connection limits (issue 17, docs/hardening.md) ------------------------------
    max_prompt_tokens: int = Field(
        2048, ge=1, description="Prompt length limit in tokens after processing (image tokens included); the "
                                "model's own position count caps it (EAS_MAX_PROMPT_TOKENS).",
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Padded-token budget of one batch (rows × longest prompt): a long prompt runs "
                                 "with few or no others instead of padding many short ones.",
    )
    preprocess_threads: int = Field(2, ge=1, le=64, description="Threads that decode images and run the processor.")
    preprocess_niceness: int = Field(
        5, ge=0, le=19, description="CPU niceness of the preprocessing threads (Linux, per thread): under "
                                    "contention for the cores the model, the bounding stage, goes first.",
    )
    prepare_inline_when_idle: bool = Field(
        True, description="Prepare a small image (<= 256 KiB, <= 512x512 pixels) on the event loop when the "
                          "server is idle (nothing else admitted, queued, running or in the pool): the pool's "
                          "round trip is pure latency then.",
    )
    max_decode_bytes: int = Field(
        512 * MiB, ge=MiB, description="Decoded-image memory that requests being preprocessed may hold at once; "
                                       "past it, 503 with Retry-After.",
    )
    max_png_chunks: int = Field(8192, ge=16, description="PNG chunks (any kind) an image may have.")
    max_png_ancillary_bytes: int = Field(4 * MiB, ge=0, description="Bytes of non-critical PNG chunks allowed.")
    max_json_values: int = Field(20_000, ge=100, description="JSON values (objects, arrays, scalars) in one body.")
    dataset_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Directories a conversion's `dataset` file may come from, besides "
                                          "easy-vqa and the store's uploads (EAS_DATASET_ROOTS, comma separated).",
    )
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Request line + headers; past it, 431.")
    header_timeout_s: float = Field(10.0, gt=0, description="Time a client has to send its complete headers.")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest pause between two chunks of a request body.")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="Idle keep-alive connections close after this.")
    max_connections: int = Field(1000, ge=1, description="Concurrent connections; past it, 503 at once.")
    client_error_burst: int = Field(
        30, ge=0, description="Refused requests (4xx, and connections refused with 431/408) a client address may "
                              "have in a burst before its requests are answered 429 unread (service/penalties.py); "
                              "0 turns the error budget off.",
    )
    client_error_rate_per_s: float = Field(5.0, ge=0, description="Refused requests per second a client earns back.")
    client_error_delay_s: float = Field(
        3.0, ge=0, description="How long a client past its error budget waits for its 429 (under the header "
                               "timeout: a spent client holds a connection no longer than a slow one may).",
    )

    # --- lifecycle ------------------------------------------------------------------------------------
    shutdown_timeout_s: float = Field(30.0, ge=0, description="Drain budget for queued/in-flight requests.")

    @field_validator("allowed_image_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        if isinstance(value, list | tuple):
            return [str(v).upper() for v in value]
        return value

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_token", "admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        # `EAS_API_TOKEN=` (set but empty) means "no token", never "the empty string is the token".
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_deadline_ms > self.max_deadline_ms:
            raise ValueError("default_deadline_ms must not exceed max_deadline_ms")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        return self
