"""The benchmark's report: what one `eas bench` run measured, as typed records (dataclasses), and its outputs
in `--out`: `bench.json` (everything, machine readable), `summary.md` (the tables the console shows) and two
plots: `latency_vs_skip_fraction.png` and `throughput_vs_concurrency.png`.

`BenchReport.to_json()` is the document `bench.json` holds (NaN, "not measurable", as null; optional
entries absent rather than null); `BenchReport.from_json()` reads such a document back, the reports in
docs/results/ included, so `summary` and `plot` work on old runs too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, TypeAdapter

from eas_tools.bench.flops import FlopCount
from eas_tools.bench.memory import MemoryResult
from eas_tools.bench.traffic import DecodeBytes

JSON_NAME = "bench.json"
SUMMARY_NAME = "summary.md"
LATENCY_PLOT = "latency_vs_skip_fraction.png"
THROUGHPUT_PLOT = "throughput_vs_concurrency.png"
SCHEMA = "eas-bench/1"

T = TypeVar("T")


def _null_is_nan(value: Any) -> Any:
    return math.nan if value is None else value


# A measured quantity: NaN in memory when it cannot be measured (a ratio over zero, a median of nothing),
# null in JSON, which has no NaN.
Figure = Annotated[float, BeforeValidator(_null_is_nan)]
# Field metadata: leave the entry out of the JSON when it is None (what was not measured in this run, or
# does not apply to this kind of run), rather than writing null.
OMIT_IF_NONE = {"omit_if_none": True}


@dataclass(frozen=True)
class PerVariant(Generic[T]):
    """One value per served variant; JSON `{"baseline": ..., "eas": ...}`."""

    baseline: T
    eas: T

    def of(self, variant: str) -> T:
        if variant not in ("baseline", "eas"):
            raise KeyError(variant)
        return self.baseline if variant == "baseline" else self.eas


@dataclass(frozen=True)
class BusyProcess:
    pid: int
    cpu_percent: float
    command: str


@dataclass
class Environment:
    """The machine and software the numbers were taken on; the `_end` fields are filled in after the run."""

    device: str
    dtype: str
    device_name: str
    cpu_cores: int
    torch_threads: int
    torch: str
    transformers: str
    python: str
    platform: str
    omp_num_threads: str | None
    load_average_start: list[float]
    busy_processes_start: list[BusyProcess]
    load_average_end: list[float] = field(default_factory=list)
    busy_processes_end: list[BusyProcess] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the two variants came from: a store version, two directories, or a random geometry."""

    source: str
    baseline_dir: str | None = field(default=None, metadata=OMIT_IF_NONE)
    eas_dir: str | None = field(default=None, metadata=OMIT_IF_NONE)
    geometry: str | None = field(default=None, metadata=OMIT_IF_NONE)
    seed: int | None = field(default=None, metadata=OMIT_IF_NONE)
    placement: str | None = field(default=None, metadata=OMIT_IF_NONE)
    random_weights: bool | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class ModelSummary:
    path: str
    skipped: list[int]
    num_layers: int
    parameters: int


@dataclass(frozen=True, kw_only=True)
class Models(ModelSource):
    baseline: ModelSummary
    eas: ModelSummary


@dataclass(frozen=True)
class FlopRatios:
    """Baseline FLOPs / EAS FLOPs (eas_tools.bench.flops.flop_ratios)."""

    total: float
    prefill: float
    per_decode_token: float
    vision: float


@dataclass(frozen=True)
class Flops:
    prompt_tokens: int
    new_tokens: int
    prefill_scores: str  # "full": the score matrices counted whole (the acceptance's reference)
    baseline: FlopCount
    eas: FlopCount
    ratio: FlopRatios
    ratio_causal_scores: FlopRatios


@dataclass(frozen=True)
class FlopsUnavailable:
    unavailable: str  # why (a model the FLOP counter does not know)


@dataclass(frozen=True)
class RawStats:
    """In-process timings of one variant: medians and samples by quantity (RawTiming.metrics names)."""

    median_s: dict[str, Figure]
    samples_s: dict[str, list[float]]
    new_tokens: list[int]
    prompt_tokens: list[int]


@dataclass(frozen=True)
class HttpStats:
    median_s: dict[str, Figure]
    samples_s: dict[str, list[float]]
    # Batch 1: the server's own timings (queue, preprocess, inference, total); batched: its batch sizes.
    server_median_s: dict[str, Figure] | None = field(default=None, metadata=OMIT_IF_NONE)
    mean_server_batch_size: float | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class Overhead:
    http_minus_raw_p50_s: Figure
    http_over_raw: Figure
    paired_diff_p50_s: Figure  # the same repetition's HTTP and raw runs differ only by the serving path


@dataclass(frozen=True)
class MemoryRatio:
    kv_cache_bytes: Figure
    weight_bytes: Figure


@dataclass(frozen=True)
class PairedSpeedup:
    """Speed-ups from the same repetition's two variants (baseline / EAS, each repetition ran both,
    interleaved): drift and neighbours' load hit both halves of a pair alike, so the median of these
    ratios is steadier than the ratio of two unpaired medians (issue 18)."""

    raw: dict[str, Figure]  # median over repetitions of the per-repetition ratio, by quantity
    http: dict[str, Figure]
    raw_e2e_ratios: list[float]  # the per-repetition ratios themselves
    http_e2e_ratios: list[float]
    http_over_raw: Figure  # median over repetitions of (HTTP ratio / raw ratio) of the same repetition


@dataclass(frozen=True)
class BatchResult:
    """Everything measured at one batch size."""

    batch_size: int
    order: list[str]  # "variant:path" in the order they ran
    memory: PerVariant[MemoryResult]
    raw: PerVariant[RawStats]
    http: PerVariant[HttpStats]
    overhead: PerVariant[Overhead]
    raw_speedup: dict[str, Figure]
    http_speedup: dict[str, Figure]
    memory_ratio: MemoryRatio
    paired: PairedSpeedup | None = field(default=None, metadata=OMIT_IF_NONE)  # absent in reports before it


@dataclass(frozen=True)
class BurstSummary:
    """A burst of requests from concurrent clients (eas_tools.bench.http.summarize_burst)."""

    requests: int
    requests_per_s: float
    latency_p50_s: float
    mean_batch_size: float


@dataclass(frozen=True)
class ThroughputRow:
    clients: int
    requests: int
    order: list[str]
    baseline: BurstSummary
    eas: BurstSummary
    speedup: Figure


@dataclass(frozen=True)
class SweepPoint:
    skip_fraction: float
    requested_fraction: float
    skipped: list[int]
    baseline_median_s: dict[str, Figure]
    eas_median_s: dict[str, Figure]
    speedup: dict[str, Figure]
    flop_ratio: Figure
    # each phase's bound (absent in reports before them): prefill's FLOP ratio, decode's bytes-read ratio
    prefill_flop_ratio: Figure | None = field(default=None, metadata=OMIT_IF_NONE)
    decode_bytes_ratio: Figure | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class SpeedBounds:
    """Batch 1, each phase's measured speed-up (paired, in-process) beside the bound that removing the
    work gives it: prefill is compute-bound, so its FLOP ratio; a decode step is memory-bound, so its ratio
    of bytes read (eas_tools/bench/traffic.py)."""

    prefill_speedup: Figure
    prefill_flop_ratio: Figure | None
    decode_per_token_speedup: Figure
    decode_bytes_ratio: Figure
    decode_bytes: PerVariant[DecodeBytes]


@dataclass(frozen=True)
class BatchAcceptance:
    http_speedup: Figure
    raw_speedup: Figure
    http_over_raw_speedup: Figure
    http_speedup_ge_flop_ratio: bool | None  # None: no FLOP count for this model
    http_speedup_ge_95pct_raw: bool
    # What the two checks above compare: "paired" (medians of per-repetition ratios; reports since issue 18)
    # or "median" (ratios of unpaired medians; earlier reports, which have no entry).
    basis: str | None = field(default=None, metadata=OMIT_IF_NONE)
    median_http_speedup: Figure | None = field(default=None, metadata=OMIT_IF_NONE)  # unpaired, for comparison
    median_raw_speedup: Figure | None = field(default=None, metadata=OMIT_IF_NONE)


_BATCH_PREFIX = "batch_"


@dataclass(frozen=True)
class Acceptance:
    """Issue 8's check per batch size; JSON keeps one `batch_<size>` entry per batch size beside the rest."""

    flop_ratio: float | None
    min_fraction_of_raw: float
    batches: dict[str, BatchAcceptance]  # by batch size, as in BenchReport.batches

    def to_dict(self) -> dict[str, Any]:
        return {"flop_ratio": self.flop_ratio, "min_fraction_of_raw": self.min_fraction_of_raw,
                **{f"{_BATCH_PREFIX}{key}": value for key, value in self.batches.items()}}

    def of(self, batch: str) -> BatchAcceptance:
        return self.batches[batch]

    @staticmethod
    def nest(data: Any) -> Any:
        """The JSON layout (`batch_<size>` keys) in the dataclass's (`batches`)."""
        if not isinstance(data, dict) or "batches" in data:
            return data
        return {"batches": {k.removeprefix(_BATCH_PREFIX): v for k, v in data.items() if k.startswith(_BATCH_PREFIX)},
                **{k: v for k, v in data.items() if not k.startswith(_BATCH_PREFIX)}}


@dataclass(frozen=True)
class BenchReport:
    schema: str
    command: list[str]
    started_unix: float
    duration_s: float
    environment: Environment
    # The run's options by name, as given (BenchOptions without `command`). Kept as a plain record: a
    # report must stay readable after the options change.
    options: dict[str, Any]
    models: Models
    flops: Flops | FlopsUnavailable
    batches: dict[str, BatchResult]  # by batch size ("1", then the batched size)
    throughput: list[ThroughputRow]
    sweep: list[SweepPoint]
    acceptance: Annotated[Acceptance, BeforeValidator(Acceptance.nest)]
    bounds: SpeedBounds | None = field(default=None, metadata=OMIT_IF_NONE)  # absent in reports before it

    def to_json(self) -> dict[str, Any]:
        """The document `bench.json` holds (strict JSON: no NaN)."""
        return jsonable(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchReport:
        return _report_adapter().validate_python(data)

    @classmethod
    def read(cls, path: Path) -> BenchReport:
        return cls.from_json(json.loads(path.read_text()))


@cache
def _report_adapter() -> TypeAdapter[BenchReport]:
    return TypeAdapter(BenchReport)


def jsonable(value: Any) -> Any:
    """Plain JSON values of a report record: dataclasses by field (or their own `to_dict`), NaN as null,
    entries marked OMIT_IF_NONE left out when None, tuples as lists, paths as strings."""
    if is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):  # records that add derived figures or lay themselves out differently
            return jsonable(value.to_dict())
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(report: BenchReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "summary": out / SUMMARY_NAME}
    paths["json"].write_text(json.dumps(report.to_json(), indent=1, allow_nan=False))
    text = summary(report)
    paths["summary"].write_text(text)
    print(text)
    try:
        paths.update(plot(report, out))
    except ImportError as exc:  # matplotlib is a dev extra; the numbers are already written
        print(f"plots skipped ({exc}); install the dev extra for them")
    return paths


# --- summary -----------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.1f} ms"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None or not math.isfinite(ratio) else f"{ratio:.3f}×"


def _frac(measured: float | None, bound: float | None) -> str:
    if measured is None or bound is None or not (math.isfinite(measured) and math.isfinite(bound)) or bound <= 0:
        return "–"
    return f"{measured / bound:.3f}"


def _mib(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


def summary(r: BenchReport) -> str:
    env, models, flops = r.environment, r.models, r.flops
    eas_skipped = models.eas.skipped
    lines = [
        "# eas bench",
        "",
        f"`{' '.join(r.command)}`",
        "",
        f"device {env.device} ({env.device_name}), {env.dtype}, {env.cpu_cores} cores, "
        f"{env.torch_threads} torch threads, torch {env.torch}, transformers {env.transformers}; "
        f"load average at start {env.load_average_start[0]:.2f}, at end {env.load_average_end[0]:.2f}; "
        f"other busy processes at start: {len(env.busy_processes_start)}, at end: "
        f"{len(env.busy_processes_end)}; {r.duration_s:.0f} s",
        "",
        f"models: {models.source}; EAS skips {len(eas_skipped)}/{models.eas.num_layers} attention layers "
        f"{eas_skipped}; parameters {models.baseline.parameters / 1e6:.1f} M → "
        f"{models.eas.parameters / 1e6:.1f} M",
        "",
    ]
    if isinstance(flops, Flops):
        ratio = flops.ratio
        lines += [f"FLOPs per request ({flops.prompt_tokens} prompt tokens, {flops.new_tokens} new): "
                  f"baseline {flops.baseline.total / 1e9:.2f} GFLOP, EAS {flops.eas.total / 1e9:.2f} "
                  f"GFLOP; ratio {_x(ratio.total)} (prefill {_x(ratio.prefill)}, per decode token "
                  f"{_x(ratio.per_decode_token)}); counting only the causal half of the prompt's attention "
                  f"scores: {_x(flops.ratio_causal_scores.total)}", ""]
    else:
        lines += [f"FLOPs: {flops.unavailable}", ""]
    for key, b in r.batches.items():
        raw, http, sp = b.raw, b.http, b.raw_speedup
        lines += [f"## batch {key}", "",
                  "| | baseline | EAS | speed-up |", "|---|---|---|---|"]
        for metric, label in (("vision_s", "vision tower + projector"), ("prefill_s", "prefill"),
                              ("decode_per_token_s", "decode, per token"), ("e2e_s", "end-to-end (raw)")):
            lines.append(f"| {label} | {_ms(raw.baseline.median_s[metric])} | "
                         f"{_ms(raw.eas.median_s[metric])} | {_x(sp[metric])} |")
        lines.append(f"| end-to-end (HTTP) | {_ms(http.baseline.median_s['e2e_s'])} | "
                     f"{_ms(http.eas.median_s['e2e_s'])} | {_x(b.http_speedup['e2e_s'])} |")
        ov = b.overhead
        lines.append(f"| HTTP − raw (p50; paired) | {_ms(ov.baseline.http_minus_raw_p50_s)}; "
                     f"{_ms(ov.baseline.paired_diff_p50_s)} | {_ms(ov.eas.http_minus_raw_p50_s)}; "
                     f"{_ms(ov.eas.paired_diff_p50_s)} | |")
        lines.append(f"| HTTP / raw | {_x(ov.baseline.http_over_raw)} | {_x(ov.eas.http_over_raw)} | |")
        if b.paired is not None:
            pr = b.paired
            lines.append(f"| paired speed-up (median of per-repetition ratios): raw; HTTP | | | "
                         f"{_x(pr.raw['e2e_s'])}; {_x(pr.http['e2e_s'])} |")
        mem = b.memory
        lines.append(f"| KV cache | {_mib(mem.baseline.kv_cache_bytes)} | {_mib(mem.eas.kv_cache_bytes)} "
                     f"| {_x(b.memory_ratio.kv_cache_bytes)} |")
        lines.append(f"| peak memory growth ({mem.eas.peak_method}) | {_mib(mem.baseline.peak_bytes)} | "
                     f"{_mib(mem.eas.peak_bytes)} | |")
        lines.append(f"| weights | {_mib(mem.baseline.weight_bytes)} | {_mib(mem.eas.weight_bytes)} | "
                     f"{_x(b.memory_ratio.weight_bytes)} |")
        base_server, eas_server = http.baseline.server_median_s, http.eas.server_median_s
        if base_server is not None and eas_server is not None:
            lines.append("| HTTP server side: queue; preprocess; inference | " + " | ".join(
                f"{_ms(p['queue_s'])}; {_ms(p['preprocess_s'])}; {_ms(p['inference_s'])}"
                for p in (base_server, eas_server)) + " | |")
        if http.baseline.mean_server_batch_size is not None and http.eas.mean_server_batch_size is not None:
            lines.append(f"| server batch size (mean) | {http.baseline.mean_server_batch_size:.2f} | "
                         f"{http.eas.mean_server_batch_size:.2f} | |")
        n = len(raw.eas.samples_s.get("e2e_s", []))
        lines += ["", f"{n} interleaved repetitions per variant and path; tokens generated: baseline "
                      f"{raw.baseline.new_tokens}, EAS {raw.eas.new_tokens}", ""]
    lines += ["## throughput vs concurrency (HTTP)", "",
              "| clients | requests | baseline req/s | EAS req/s | speed-up | baseline p50 | EAS p50 | "
              "mean batch (baseline / EAS) |", "|---|---|---|---|---|---|---|---|"]
    for row in r.throughput:
        base, eas = row.baseline, row.eas
        lines.append(f"| {row.clients} | {row.requests} | {base.requests_per_s:.2f} | {eas.requests_per_s:.2f} "
                     f"| {_x(row.speedup)} | {_ms(base.latency_p50_s)} | {_ms(eas.latency_p50_s)} | "
                     f"{base.mean_batch_size:.2f} / {eas.mean_batch_size:.2f} |")
    if r.bounds is not None:
        b = r.bounds
        per_step = b.decode_bytes
        lines += ["", "## speed-up against each phase's bound (raw, batch 1, paired)", "",
                  "| phase | measured speed-up | bound | measured / bound |", "|---|---|---|---|",
                  f"| prefill (compute-bound) | {_x(b.prefill_speedup)} | FLOP ratio {_x(b.prefill_flop_ratio)} | "
                  f"{_frac(b.prefill_speedup, b.prefill_flop_ratio)} |",
                  f"| decode, per token (memory-bound) | {_x(b.decode_per_token_speedup)} | bytes ratio "
                  f"{_x(b.decode_bytes_ratio)} | {_frac(b.decode_per_token_speedup, b.decode_bytes_ratio)} |",
                  "", f"bytes read per decode step: baseline {_mib(per_step.baseline.weights)} weights + "
                      f"{_mib(int(per_step.baseline.kv_cache))} KV; EAS {_mib(per_step.eas.weights)} weights + "
                      f"{_mib(int(per_step.eas.kv_cache))} KV ({per_step.eas.attention_layers} attention layers)"]
    if r.sweep:
        lines += ["", "## skip-fraction sweep (raw, batch 1)", "",
                  "| skipped | baseline e2e | EAS e2e | speed-up | prefill speed-up (FLOP ratio) | decode/token "
                  "speed-up (bytes ratio) | FLOP ratio |", "|---|---|---|---|---|---|---|"]
        for p in r.sweep:
            lines.append(f"| {len(p.skipped)} ({p.skip_fraction:.2f}) | {_ms(p.baseline_median_s['e2e_s'])} "
                         f"| {_ms(p.eas_median_s['e2e_s'])} | {_x(p.speedup['e2e_s'])} | "
                         f"{_x(p.speedup['prefill_s'])} ({_x(p.prefill_flop_ratio)}) | "
                         f"{_x(p.speedup['decode_per_token_s'])} ({_x(p.decode_bytes_ratio)}) | "
                         f"{_x(p.flop_ratio)} |")
    acc = r.acceptance
    lines += ["", "## acceptance (HTTP speed-up ≥ FLOP ratio and ≥ 95% of the raw speed-up)", ""]
    for key in r.batches:
        a = acc.of(key)
        medians = (f"; unpaired medians: HTTP {_x(a.median_http_speedup)}, raw {_x(a.median_raw_speedup)}"
                   if a.median_http_speedup is not None and a.median_raw_speedup is not None else "")
        lines.append(f"- batch {key} ({a.basis or 'median'}): HTTP {_x(a.http_speedup)}, raw {_x(a.raw_speedup)} "
                     f"(HTTP/raw {a.http_over_raw_speedup:.3f}), FLOP ratio {_x(acc.flop_ratio)}: "
                     f"≥ FLOP ratio {_yes(a.http_speedup_ge_flop_ratio)}, ≥ 95% of raw "
                     f"{_yes(a.http_speedup_ge_95pct_raw)}{medians}")
    return "\n".join(lines) + "\n"


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


# --- plots -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyPoint:
    fraction: float
    baseline_s: float
    eas_s: float
    speedup: float
    flop_ratio: float


def latency_points(r: BenchReport) -> list[LatencyPoint]:
    """Batch-1 points (skip fraction, baseline, EAS, speed-up, FLOP ratio): the sweep when it ran, else the
    baseline itself at fraction 0 and the main EAS model."""
    if r.sweep:
        return [LatencyPoint(fraction=p.skip_fraction, baseline_s=p.baseline_median_s["e2e_s"],
                             eas_s=p.eas_median_s["e2e_s"], speedup=p.speedup["e2e_s"], flop_ratio=p.flop_ratio)
                for p in r.sweep]
    b = r.batches["1"]
    eas = r.models.eas
    base_s = b.raw.baseline.median_s["e2e_s"]
    flop_ratio = r.flops.ratio.total if isinstance(r.flops, Flops) else math.nan
    return [LatencyPoint(fraction=0.0, baseline_s=base_s, eas_s=base_s, speedup=1.0, flop_ratio=1.0),
            LatencyPoint(fraction=len(eas.skipped) / eas.num_layers, baseline_s=base_s,
                         eas_s=b.raw.eas.median_s["e2e_s"], speedup=b.raw_speedup["e2e_s"], flop_ratio=flop_ratio)]


def plot(r: BenchReport, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    env = r.environment
    where = (f"{env.device} ({env.device_name[:40]}), {env.dtype}, {env.torch_threads} torch thread(s), "
             f"torch {env.torch}")
    paths = {}

    points = sorted(latency_points(r), key=lambda p: p.fraction)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    fractions = [p.fraction for p in points]
    ax1.plot(fractions, [p.eas_s * 1e3 for p in points], "o-", label="model skipping this fraction")
    ax1.plot(fractions, [p.baseline_s * 1e3 for p in points], "s--", color="gray", label="baseline (same runs)")
    ax1.set_xlabel("fraction of attention layers skipped")
    ax1.set_ylabel("end-to-end latency, batch 1, median (ms)")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(fractions, [p.speedup for p in points], "o-", label="measured speed-up (raw)")
    ax2.plot(fractions, [p.flop_ratio for p in points], "^:", label="FLOP ratio")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xlabel("fraction of attention layers skipped")
    ax2.set_ylabel("baseline / EAS")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"latency vs skip fraction — {where}", fontsize=9)
    paths["latency_plot"] = _save(fig, out / LATENCY_PLOT)

    rows = r.throughput
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    clients = [row.clients for row in rows]
    ax.plot(clients, [row.baseline.requests_per_s for row in rows], "s--", color="gray", label="baseline")
    ax.plot(clients, [row.eas.requests_per_s for row in rows], "o-", label="EAS")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients (HTTP, loopback)")
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"throughput vs concurrency — {where}", fontsize=9)
    paths["throughput_plot"] = _save(fig, out / THROUGHPUT_PLOT)
    return paths


def _save(fig: Any, path: Path) -> Path:
    """Write a finished figure as PNG and free it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
