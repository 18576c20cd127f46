"""Writes dashboards/eas-serve.json, the Grafana dashboard of the service (serving-conventions §10).

The JSON is versioned in the repository and provisioned as is; this script is how it is edited, so the
panels stay uniform (one datasource variable, the `model`/`variant` filters, `$__rate_interval`).
`python deploy/grafana/build_dashboard.py` rewrites it; tests/observability/ checks the two agree and that
every `eas_` metric used here is one the service exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UID = "eas-serve-overview"  # fixed: links and provisioning find the dashboard by it
OUT = Path(__file__).parent / "dashboards" / "eas-serve.json"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
MV = 'model=~"$model", variant=~"$variant"'  # the filter every per-variant query carries
RATE = "[$__rate_interval]"


def quantile(q: float, metric: str, selector: str = MV, by: str = "variant") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}{RATE})))"


def mean(metric: str, selector: str = MV, by: str = "variant") -> str:
    return (f"sum by ({by}) (rate({metric}_sum{{{selector}}}{RATE})) / "
            f"sum by ({by}) (rate({metric}_count{{{selector}}}{RATE}))")


def speedup(rule: str) -> str:
    """A speedup recording rule (deploy/prometheus/rules/eas-recording.yml) for the selected models: the
    like-for-like comparison is a few rules deep (per batch size, guarded, weighted), so the dashboard reads
    it rather than restating it, and shows exactly what the alerts judge."""
    return f'{rule}{{model=~"$model"}}'


class Layout:
    """Hands out panel ids and grid positions, left to right, top to bottom (24 columns)."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = self.row_h = 0


def targets(*queries: tuple[str, str], instant: bool = False, fmt: str = "time_series") -> list[dict[str, Any]]:
    return [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
             "instant": instant, "range": not instant, "format": fmt}
            for i, (expr, legend) in enumerate(queries)]


def timeseries(title: str, description: str, queries: list[tuple[str, str]], unit: str, *,
               stack: bool = False, **extra: Any) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 0,
                              "showPoints": "never", "spanNulls": True,
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets(*queries),
            "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                   "calcs": ["mean", "max", "lastNotNull"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            **extra}


def stat(title: str, description: str, expr: str, unit: str, steps: list[tuple[str, float | None]],
         *, calc: str = "mean", decimals: int = 2) -> dict[str, Any]:
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": targets((expr, "")),
            "fieldConfig": {"defaults": {
                "unit": unit, "decimals": decimals,
                "thresholds": {"mode": "absolute",
                               "steps": [{"color": color, "value": value} for color, value in steps]}},
                "overrides": []},
            "options": {"reduceOptions": {"calcs": [calc], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "value",
                        "justifyMode": "center", "orientation": "auto"}}


SPEEDUP_STEPS = [("red", None), ("orange", 1.05), ("green", 1.2)]


def panels() -> list[dict[str, Any]]:
    g = Layout()

    g.row("Latency: eas vs baseline")
    g.add(timeseries(
        "Request latency p50 / p95 / p99 (answered)",
        "Server-side end-to-end time of requests answered with 200, per variant "
        "(eas_request_duration_seconds). Refusals are left out: they are fast and would flatter the percentiles.",
        [(quantile(q, "eas_request_duration_seconds", f'{MV}, code="200"'), f"{{{{variant}}}} p{p}")
         for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))], "s"), w=12)
    g.add(timeseries(
        "Model latency p50 / p95 / p99",
        "Generation plus detokenisation of the request's batch (eas_inference_duration_seconds): what a request "
        "waited for. Not a comparison of the variants when their batch sizes differ: the speedups are.",
        [(quantile(q, "eas_inference_duration_seconds"), f"{{{{variant}}}} p{p}")
         for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))], "s"), w=12)
    g.add(stat("Model speedup (p50)", "Baseline ÷ eas p50 model time per batch, compared batch size by batch "
               "size on live traffic and weighted by the eas batches at each size (eas:inference_speedup:p50_5m); "
               "> 1 means EAS is faster. Empty while a side has fewer than 20 batches of a size in 5 minutes. "
               "Mean over the time range.", speedup("eas:inference_speedup:p50_5m"), "none", SPEEDUP_STEPS),
          w=6, h=5)
    g.add(stat("Model speedup (p95)", "As the p50 speedup, at the 95th percentile (eas:inference_speedup:p95_5m).",
               speedup("eas:inference_speedup:p95_5m"), "none", SPEEDUP_STEPS), w=6, h=5)
    g.add(stat("Shadow speedup (p50)", "Baseline batches holding mirrored eas requests (same inputs) ÷ live eas "
               "batches of the same size, p50 model time (eas:shadow_inference_speedup:p50_5m). Empty while "
               "shadow mode is off (EAS_SHADOW_FRACTION=0).",
               speedup("eas:shadow_inference_speedup:p50_5m"), "none", SPEEDUP_STEPS), w=6, h=5)
    g.add(stat("Batch sizes compared", "How many batch sizes each speedup currently compares (both variants "
               "ran at least 20 batches of the size in 5 minutes).",
               'count by (model) (eas:inference_speedup_by_batch_size:p50_5m{model=~"$model"})', "short",
               [("red", None), ("green", 1)], calc="lastNotNull", decimals=0), w=6, h=5)
    g.add(timeseries(
        "Model speedup by batch size (p50)", "Baseline ÷ eas p50 model time per batch at each batch size, live "
        "traffic, and on mirrored inputs (eas:inference_speedup_by_batch_size:p50_5m, "
        "eas:shadow_inference_speedup_by_batch_size:p50_5m).",
        [(speedup("eas:inference_speedup_by_batch_size:p50_5m"), "live, batch {{batch_size}}"),
         (speedup("eas:shadow_inference_speedup_by_batch_size:p50_5m"), "shadow, batch {{batch_size}}")],
        "none"), w=12)
    g.add(timeseries(
        "Model time per batch by batch size (p50)", "Generation + detokenisation of each executed batch "
        "(eas_batch_inference_duration_seconds) per variant, batch size and traffic: `shadow` batches held "
        "mirrored requests and are kept apart from the baseline's live ones.",
        [(quantile(0.5, "eas_batch_inference_duration_seconds", by="variant, traffic, batch_size"),
          "{{variant}} {{traffic}} batch {{batch_size}}")], "s"), w=12)

    g.row("Streaming: time to first token and per output token")
    g.add(timeseries(
        "Time to first token p50 / p95", "Request arrival to the request's first generated token on the "
        "server, per variant (eas_time_to_first_token_seconds via eas:time_to_first_token_seconds:p50_5m / "
        "p95_5m): what a streaming client waits before the first chunk.",
        [(f'eas:time_to_first_token_seconds:p{p}_5m{{{MV}}}', f"{{{{variant}}}} p{p}") for p in (50, 95)], "s"),
        w=12)
    g.add(timeseries(
        "Time per output token p50 / p95", "Mean time between a request's later tokens, per variant "
        "(eas_time_per_output_token_seconds via eas:time_per_output_token_seconds:p50_5m / p95_5m): the pace "
        "of a stream once it has started.",
        [(f'eas:time_per_output_token_seconds:p{p}_5m{{{MV}}}', f"{{{{variant}}}} p{p}") for p in (50, 95)],
        "s"), w=12)

    g.row("Shadow traffic")
    g.add(stat("Shadow answer agreement", "Share of mirrored requests whose baseline answer equals the eas "
               "answer (eas_shadow_agreement_total).",
               'sum(rate(eas_shadow_agreement_total{model=~"$model", result="match"}' + RATE + ')) / '
               'sum(rate(eas_shadow_agreement_total{model=~"$model"}' + RATE + '))', "percentunit",
               [("red", None), ("orange", 0.8), ("green", 0.95)], decimals=1), w=6)
    g.add(timeseries("Shadow requests by outcome", "completed, suspended (baseline queue above "
                     "EAS_SHADOW_MAX_QUEUE_DEPTH, or not ready), expired, failed (eas_shadow_requests_total).",
                     [('sum by (outcome) (rate(eas_shadow_requests_total{model=~"$model"}' + RATE + "))",
                       "{{outcome}}")], "reqps"), w=9)
    g.add(timeseries("Shadow baseline vs live eas (p50 model time per request)", "The baseline's model time on "
                     "mirrored requests (eas_shadow_inference_duration_seconds) next to the live eas model time "
                     "(batch sizes not matched: the shadow speedup compares them batch size by batch size).",
                     [(quantile(0.5, "eas_shadow_inference_duration_seconds", 'model=~"$model"'),
                       "baseline (shadow) p50"),
                      (quantile(0.5, "eas_inference_duration_seconds", 'model=~"$model", variant="eas"'),
                       "eas (live) p50")], "s"), w=9)

    g.row("Traffic and errors")
    g.add(timeseries("Throughput", "Requests per second by variant and status code (eas_requests_total).",
                     [(f"sum by (variant, code) (rate(eas_requests_total{{{MV}}}{RATE}))", "{{variant}} {{code}}")],
                     "reqps"), w=8)
    g.add(timeseries("Generated tokens", "Completion tokens returned per second (eas_generated_tokens_total).",
                     [(f"sum by (variant) (rate(eas_generated_tokens_total{{{MV}}}{RATE}))", "{{variant}}")],
                     "short"), w=8)
    g.add(timeseries("Prompt tokens per request (mean)", "Prompt tokens each request ran through the decoder, "
                     "per variant (eas_prompt_tokens): a conversion that keeps fewer image tokens "
                     "(docs/conversion.md, visual-token reduction) shows its smaller prompts here.",
                     [(mean("eas_prompt_tokens"), "{{variant}}")], "short"), w=8)
    g.add(timeseries("Errors and rejections", "Non-2xx answers by code and variant, and refusals by reason "
                     "(eas_requests_rejected_total: queue_full, payload_too_large, timeout, invalid_image, ...).",
                     [(f'sum by (variant, code) (rate(eas_requests_total{{{MV}, code!~"2.."}}{RATE}))',
                       "{{variant}} {{code}}"),
                      (f"sum by (reason) (rate(eas_requests_rejected_total{RATE}))", "rejected: {{reason}}")],
                     "reqps"), w=8)

    g.row("Queue and batching")
    g.add(timeseries("Queue depth", "Admitted requests not started yet, the queue's capacity, and requests in "
                     "flight (eas_queue_depth, eas_queue_capacity, eas_requests_in_flight).",
                     [(f"sum by (variant) (eas_queue_depth{{{MV}}})", "{{variant}} depth"),
                      (f"max by (variant) (eas_queue_capacity{{{MV}}})", "{{variant}} capacity"),
                      ("sum(eas_requests_in_flight)", "in flight (all variants)")],
                     "short"), w=8)
    g.add(timeseries("Queue wait p50 / p95", "Enqueue to the start of the request's batch "
                     "(eas_request_queue_duration_seconds).",
                     [(quantile(0.5, "eas_request_queue_duration_seconds"), "{{variant}} p50"),
                      (quantile(0.95, "eas_request_queue_duration_seconds"), "{{variant}} p95")], "s"), w=8)
    g.add(timeseries("Batch size", "Requests per executed batch of live traffic: mean and p95 (eas_batch_size; "
                     "batches holding mirrored requests are left out).",
                     [(mean("eas_batch_size"), "{{variant}} mean"),
                      (quantile(0.95, "eas_batch_size"), "{{variant}} p95")], "short"), w=8)
    g.add(timeseries("Batches by batch size and traffic", "Executed batches per second by variant, batch size "
                     "and traffic (live, or shadow: holding mirrored requests), from "
                     "eas_batch_inference_duration_seconds_count.",
                     [(f"sum by (variant, traffic, batch_size) (rate(eas_batch_inference_duration_seconds_count"
                       f"{{{MV}}}{RATE}))", "{{variant}} {{traffic}} batch {{batch_size}}")], "short"), w=24)

    g.row("Where the time goes")
    phases = [("eas_request_queue_duration_seconds", "queue"), ("eas_preprocess_duration_seconds", "preprocess"),
              ("eas_vision_encoder_duration_seconds", "vision encoder"), ("eas_prefill_duration_seconds", "prefill"),
              ("eas_decode_duration_seconds", "decode")]
    g.add(timeseries("Mean time per request by phase: $variant",
                     "Stacked means per answered request: queue wait, image decode + processor, then the model's "
                     "vision encoder, prefill (to the first token) and decode (later tokens). Repeated per variant.",
                     [(mean(metric, 'model=~"$model", variant=~"$variant"', by="model"), label)
                      for metric, label in phases], "s", stack=True,
                     repeat="variant", repeatDirection="h", maxPerRow=2), w=24)
    g.add(timeseries("Model phases p50 by variant", "Median vision encoder, prefill and decode time of each "
                     "variant: attention skipping shows in prefill and decode.",
                     [(quantile(0.5, metric), f"{{{{variant}}}} {label}") for metric, label in phases[2:]], "s"),
          w=12)

    g.row("Served models and process")
    g.add({"type": "table", "title": "Served variants", "description": "eas_model_info: what each replica serves.",
           "datasource": DS,
           "targets": targets(('max by (model, variant, version, kind, dtype, device, skipped_layers) '
                               '(eas_model_info{model=~"$model"})', ""), instant=True, fmt="table"),
           "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
           "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True}}, w=12)
    g.add(stat("Ready replicas", "Replicas answering /health/ready with 200 (eas_model_ready).",
               "sum(eas_model_ready)", "short", [("red", None), ("green", 1)], calc="lastNotNull", decimals=0),
          w=4)
    g.add(timeseries("Event loop lag", "How late the event loop ran a timer; > 0.1 s hurts every request "
                     "(eas_event_loop_lag_seconds).",
                     [("max by (instance) (eas_event_loop_lag_seconds)", "{{instance}}")], "s"), w=8)
    g.add(timeseries("Process memory", "Resident memory of the service processes.",
                     [("process_resident_memory_bytes and on (job, instance) eas_model_ready", "{{instance}}")],
                     "bytes"), w=12)
    g.add(timeseries("Image size p50 / p95", "Encoded image bytes per request as uploaded, after base64 decoding "
                     "(eas_image_bytes; power-of-two buckets from 256 B).",
                     [(quantile(0.5, "eas_image_bytes"), "{{variant}} p50"),
                      (quantile(0.95, "eas_image_bytes"), "{{variant}} p95")], "bytes"), w=12)

    g.row("Conversion jobs")
    g.add(stat("Conversions running", "Conversion worker processes running now (eas_conversion_jobs_in_progress).",
               "sum(eas_conversion_jobs_in_progress)", "short", [("blue", None)], calc="lastNotNull",
               decimals=0), w=4)
    g.add(timeseries("Finished conversions by status", "Jobs reaching succeeded / failed / cancelled "
                     "(eas_conversion_jobs_total).",
                     [(f"sum by (status) (increase(eas_conversion_jobs_total{RATE}))", "{{status}}")], "short",
                     stack=True), w=10)
    g.add(timeseries("Conversion run time p50 / p95", "Start-to-finish time of finished jobs "
                     "(eas_conversion_job_duration_seconds); conversions are rare, so the window is 6 h.",
                     [("histogram_quantile(0.5, sum by (le, status) "
                       "(increase(eas_conversion_job_duration_seconds_bucket[6h])))", "{{status}} p50"),
                      ("histogram_quantile(0.95, sum by (le, status) "
                       "(increase(eas_conversion_job_duration_seconds_bucket[6h])))", "{{status}} p95")], "s"),
          w=10)
    return g.panels


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "definition": query, "query": {"query": query, "refId": f"{name}-values"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0}


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "eas-serve: EAS vs baseline",
        "description": "Latency, speedup and shadow agreement of the EAS-converted variant against its unskipped "
                       "baseline; traffic, queueing, batching, model phases and conversion jobs.",
        "tags": ["eas-serve", "inference"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [
            # A datasource variable, never a hard-coded uid: works provisioned and imported alike.
            {"type": "datasource", "name": "DS_PROMETHEUS", "label": "Prometheus", "query": "prometheus",
             "regex": "", "hide": 0, "refresh": 1, "current": {}},
            variable("model", "Model", "label_values(eas_model_info, model)"),
            variable("variant", "Variant", 'label_values(eas_model_info{model=~"$model"}, variant)'),
        ]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
