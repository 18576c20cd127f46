"""The benchmark's outputs in `--out`: `bench.json` (everything, machine readable), `summary.md` (the tables
the console shows) and two plots: `latency_vs_skip_fraction.png` and `throughput_vs_concurrency.png`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

JSON_NAME = "bench.json"
SUMMARY_NAME = "summary.md"
LATENCY_PLOT = "latency_vs_skip_fraction.png"
THROUGHPUT_PLOT = "throughput_vs_concurrency.png"


def _clean(value: Any) -> Any:
    """JSON has no NaN: unmeasurable ratios become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "summary": out / SUMMARY_NAME}
    paths["json"].write_text(json.dumps(_clean(report), indent=1, allow_nan=False))
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


def _mib(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


def summary(r: dict[str, Any]) -> str:
    env, models, flops = r["environment"], r["models"], r["flops"]
    eas_skipped = models["eas"]["skipped"]
    lines = [
        "# eas bench",
        "",
        f"`{' '.join(r['command'])}`",
        "",
        f"device {env['device']} ({env['device_name']}), {env['dtype']}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads, torch {env['torch']}, transformers {env['transformers']}; "
        f"load average at start {env['load_average_start'][0]:.2f}, at end {env['load_average_end'][0]:.2f}; "
        f"other busy processes at start: {len(env['busy_processes_start'])}, at end: "
        f"{len(env['busy_processes_end'])}; {r['duration_s']:.0f} s",
        "",
        f"models: {models['source']}; EAS skips {len(eas_skipped)}/{models['eas']['num_layers']} attention layers "
        f"{eas_skipped}; parameters {models['baseline']['parameters'] / 1e6:.1f} M → "
        f"{models['eas']['parameters'] / 1e6:.1f} M",
        "",
    ]
    if "ratio" in flops:
        ratio = flops["ratio"]
        lines += [f"FLOPs per request ({flops['prompt_tokens']} prompt tokens, {flops['new_tokens']} new): "
                  f"baseline {flops['baseline']['total'] / 1e9:.2f} GFLOP, EAS {flops['eas']['total'] / 1e9:.2f} "
                  f"GFLOP; ratio {_x(ratio['total'])} (prefill {_x(ratio['prefill'])}, per decode token "
                  f"{_x(ratio['per_decode_token'])}); counting only the causal half of the prompt's attention "
                  f"scores: {_x(flops['ratio_causal_scores']['total'])}", ""]
    else:
        lines += [f"FLOPs: {flops.get('unavailable')}", ""]
    for key, b in r["batches"].items():
        raw, http, sp = b["raw"], b["http"], b["raw_speedup"]
        lines += [f"## batch {key}", "",
                  "| | baseline | EAS | speed-up |", "|---|---|---|---|"]
        for metric, label in (("vision_s", "vision tower + projector"), ("prefill_s", "prefill"),
                              ("decode_per_token_s", "decode, per token"), ("e2e_s", "end-to-end (raw)")):
            lines.append(f"| {label} | {_ms(raw['baseline']['median_s'][metric])} | "
                         f"{_ms(raw['eas']['median_s'][metric])} | {_x(sp[metric])} |")
        lines.append(f"| end-to-end (HTTP) | {_ms(http['baseline']['median_s']['e2e_s'])} | "
                     f"{_ms(http['eas']['median_s']['e2e_s'])} | {_x(b['http_speedup']['e2e_s'])} |")
        ov = b["overhead"]
        lines.append(f"| HTTP − raw (p50; paired) | {_ms(ov['baseline']['http_minus_raw_p50_s'])}; "
                     f"{_ms(ov['baseline']['paired_diff_p50_s'])} | {_ms(ov['eas']['http_minus_raw_p50_s'])}; "
                     f"{_ms(ov['eas']['paired_diff_p50_s'])} | |")
        lines.append(f"| HTTP / raw | {_x(ov['baseline']['http_over_raw'])} | {_x(ov['eas']['http_over_raw'])} | |")
        mem = b["memory"]
        lines.append(f"| KV cache | {_mib(mem['baseline']['kv_cache_bytes'])} | {_mib(mem['eas']['kv_cache_bytes'])} "
                     f"| {_x(b['memory_ratio']['kv_cache_bytes'])} |")
        lines.append(f"| peak memory growth ({mem['eas']['peak_method']}) | {_mib(mem['baseline']['peak_bytes'])} | "
                     f"{_mib(mem['eas']['peak_bytes'])} | |")
        lines.append(f"| weights | {_mib(mem['baseline']['weight_bytes'])} | {_mib(mem['eas']['weight_bytes'])} | "
                     f"{_x(b['memory_ratio']['weight_bytes'])} |")
        if "server_median_s" in http["eas"]:
            parts = {v: http[v]["server_median_s"] for v in ("baseline", "eas")}
            lines.append("| HTTP server side: queue; preprocess; inference | " + " | ".join(
                f"{_ms(p['queue_s'])}; {_ms(p['preprocess_s'])}; {_ms(p['inference_s'])}" for p in parts.values())
                + " | |")
        if "mean_server_batch_size" in http["eas"]:
            lines.append(f"| server batch size (mean) | {http['baseline']['mean_server_batch_size']:.2f} | "
                         f"{http['eas']['mean_server_batch_size']:.2f} | |")
        n = len(raw["eas"]["samples_s"].get("e2e_s", []))
        lines += ["", f"{n} interleaved repetitions per variant and path; tokens generated: baseline "
                      f"{raw['baseline']['new_tokens']}, EAS {raw['eas']['new_tokens']}", ""]
    lines += ["## throughput vs concurrency (HTTP)", "",
              "| clients | requests | baseline req/s | EAS req/s | speed-up | baseline p50 | EAS p50 | "
              "mean batch (baseline / EAS) |", "|---|---|---|---|---|---|---|---|"]
    for row in r["throughput"]:
        b, e = row["baseline"], row["eas"]
        lines.append(f"| {row['clients']} | {row['requests']} | {b['requests_per_s']:.2f} | {e['requests_per_s']:.2f} "
                     f"| {_x(row['speedup'])} | {_ms(b['latency_p50_s'])} | {_ms(e['latency_p50_s'])} | "
                     f"{b['mean_batch_size']:.2f} / {e['mean_batch_size']:.2f} |")
    if r["sweep"]:
        lines += ["", "## skip-fraction sweep (raw, batch 1)", "",
                  "| skipped | baseline e2e | EAS e2e | speed-up | prefill speed-up | decode/token speed-up "
                  "| FLOP ratio |", "|---|---|---|---|---|---|---|"]
        for p in r["sweep"]:
            lines.append(f"| {len(p['skipped'])} ({p['skip_fraction']:.2f}) | {_ms(p['baseline_median_s']['e2e_s'])} "
                         f"| {_ms(p['eas_median_s']['e2e_s'])} | {_x(p['speedup']['e2e_s'])} | "
                         f"{_x(p['speedup']['prefill_s'])} | {_x(p['speedup']['decode_per_token_s'])} | "
                         f"{_x(p['flop_ratio'])} |")
    acc = r["acceptance"]
    lines += ["", "## acceptance (HTTP speed-up ≥ FLOP ratio and ≥ 95% of the raw speed-up)", ""]
    for key in r["batches"]:
        a = acc[f"batch_{key}"]
        lines.append(f"- batch {key}: HTTP {_x(a['http_speedup'])}, raw {_x(a['raw_speedup'])} "
                     f"(HTTP/raw {a['http_over_raw_speedup']:.3f}), FLOP ratio {_x(acc['flop_ratio'])}: "
                     f"≥ FLOP ratio {_yes(a['http_speedup_ge_flop_ratio'])}, ≥ 95% of raw "
                     f"{_yes(a['http_speedup_ge_95pct_raw'])}")
    return "\n".join(lines) + "\n"


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


# --- plots -------------------------------------------------------------------------------------------


def latency_points(r: dict[str, Any]) -> list[dict[str, float]]:
    """Batch-1 points (skip fraction, baseline, EAS, speed-up, FLOP ratio): the sweep when it ran, else the
    baseline itself at fraction 0 and the main EAS model."""
    if r["sweep"]:
        return [{"fraction": p["skip_fraction"], "baseline_s": p["baseline_median_s"]["e2e_s"],
                 "eas_s": p["eas_median_s"]["e2e_s"], "speedup": p["speedup"]["e2e_s"],
                 "flop_ratio": p["flop_ratio"]} for p in r["sweep"]]
    b = r["batches"]["1"]
    eas = r["models"]["eas"]
    base_s = b["raw"]["baseline"]["median_s"]["e2e_s"]
    return [{"fraction": 0.0, "baseline_s": base_s, "eas_s": base_s, "speedup": 1.0, "flop_ratio": 1.0},
            {"fraction": len(eas["skipped"]) / eas["num_layers"], "baseline_s": base_s,
             "eas_s": b["raw"]["eas"]["median_s"]["e2e_s"], "speedup": b["raw_speedup"]["e2e_s"],
             "flop_ratio": r["flops"].get("ratio", {}).get("total", float("nan"))}]


def plot(r: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    env = r["environment"]
    where = (f"{env['device']} ({env['device_name'][:40]}), {env['dtype']}, {env['torch_threads']} torch "
             f"thread(s), torch {env['torch']}")
    paths = {}

    points = sorted(latency_points(r), key=lambda p: p["fraction"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    fractions = [p["fraction"] for p in points]
    ax1.plot(fractions, [p["eas_s"] * 1e3 for p in points], "o-", label="model skipping this fraction")
    ax1.plot(fractions, [p["baseline_s"] * 1e3 for p in points], "s--", color="gray", label="baseline (same runs)")
    ax1.set_xlabel("fraction of attention layers skipped")
    ax1.set_ylabel("end-to-end latency, batch 1, median (ms)")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(fractions, [p["speedup"] for p in points], "o-", label="measured speed-up (raw)")
    ax2.plot(fractions, [p["flop_ratio"] for p in points], "^:", label="FLOP ratio")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xlabel("fraction of attention layers skipped")
    ax2.set_ylabel("baseline / EAS")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"latency vs skip fraction — {where}", fontsize=9)
    paths["latency_plot"] = _save(fig, out / LATENCY_PLOT)

    rows = r["throughput"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    clients = [row["clients"] for row in rows]
    ax.plot(clients, [row["baseline"]["requests_per_s"] for row in rows], "s--", color="gray", label="baseline")
    ax.plot(clients, [row["eas"]["requests_per_s"] for row in rows], "o-", label="EAS")
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
