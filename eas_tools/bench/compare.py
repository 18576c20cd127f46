"""`eas compare`: ask a running server the same questions through both of its variants and compare them.

Each repetition sends one (image, question) pair to every variant, one request at a time, with the order
flipped every repetition (`ab_order`), so drift on a shared machine lands on both variants alike and each
variant sees batches of one: like for like. The latencies compared are the **server's own** timings
(`timings` in the `/v1/answer` body: inference = the model's generate call, total = admission to answer),
not the client's round trip, which adds the client's own noise. Reported per variant: medians (and p90)
of inference, total and round-trip time; the speed-up as the median of the paired per-repetition ratios
(baseline / eas) beside the ratio of the medians; and how often the two variants gave the same answer.

Only an HTTP client: it imports neither torch nor the service, so it runs anywhere that can reach the
server. Questions come from the easy-vqa test split (shipped with the `easy-vqa` package) unless
`--image`/`--question` name one pair.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import typer

from eas_tools.bench.interleave import ab_order

TIMING_KEYS = ("inference_s", "total_s")


class CompareError(Exception):
    """A problem the user can fix (unreachable server, one variant only, bad image path): one line."""


@dataclass(frozen=True)
class Question:
    image: bytes
    question: str
    answer: str | None = None  # gold answer, when the dataset has one


@dataclass
class VariantStats:
    variant: str
    model: str
    version: str
    skipped_layers: list[int]
    inference_ms_p50: float
    inference_ms_p90: float
    total_ms_p50: float
    round_trip_ms_p50: float
    accuracy: float | None


@dataclass
class CompareReport:
    url: str
    requests: int
    variants: list[VariantStats]
    speedup_inference_paired_median: float
    speedup_inference_ratio_of_medians: float
    speedup_total_paired_median: float
    agreement: float
    disagreements: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def easy_vqa_questions(count: int, seed: int) -> list[Question]:
    """`count` questions drawn (seeded) from the easy-vqa test split, with their images and gold answers."""
    import easy_vqa  # pure data package, no heavy imports

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picks = random.Random(seed).sample(range(len(questions)), min(count, len(questions)))
    cache: dict[int, bytes] = {}
    out = []
    for i in picks:
        image_id = image_ids[i]
        if image_id not in cache:
            cache[image_id] = Path(paths[image_id]).read_bytes()
        out.append(Question(cache[image_id], questions[i], answers[i]))
    return out


def single_question(image: Path, question: str) -> list[Question]:
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise CompareError(f"cannot read --image {image}: {exc.strerror or exc}") from None
    return [Question(data, question)]


def _variants(client: httpx.Client) -> list[dict]:
    response = client.get("/info")
    if response.status_code != 200:
        raise CompareError(f"GET /info answered {response.status_code}: {response.text[:200]}")
    return response.json()["variants"]


def _ask(client: httpx.Client, variant: str, q: Question, max_new_tokens: int) -> tuple[str, dict[str, float], float]:
    start = time.perf_counter()
    response = client.post("/v1/answer", files={"image": ("image.png", q.image)},
                           data={"question": q.question, "variant": variant, "max_new_tokens": str(max_new_tokens)})
    round_trip = time.perf_counter() - start
    if response.status_code != 200:
        raise CompareError(f"variant {variant!r} answered {response.status_code}: {response.text[:200]}")
    body = response.json()
    return body["answer"], body["timings"], round_trip


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def compare(
    url: str,
    questions: Sequence[Question],
    *,
    variants: tuple[str, str] = ("eas", "baseline"),
    warmup: int = 5,
    max_new_tokens: int = 8,
    token: str | None = None,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> CompareReport:
    """Interleaved batch-1 comparison of two variants of the server at `url` (see the module docstring)."""
    if not questions:
        raise CompareError("no questions to ask")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    fast, slow = variants
    try:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:
            served = {v["variant"]: v for v in _variants(client)}
            missing = [v for v in variants if v not in served]
            if missing:
                raise CompareError(
                    f"the server at {url} serves {sorted(served)} but not {missing}: serve a converted model "
                    "(its baseline is loaded beside it) to compare")
            for i in range(warmup):  # first requests pay for lazy initialisation on both sides
                for variant in variants:
                    _ask(client, variant, questions[i % len(questions)], max_new_tokens)
            answers: dict[str, list[str]] = {v: [] for v in variants}
            timings: dict[str, dict[str, list[float]]] = {v: {k: [] for k in (*TIMING_KEYS, "rtt")} for v in variants}
            iterator = range(len(questions))
            if progress:
                from tqdm import tqdm

                iterator = tqdm(iterator, desc="compare", unit="pair")
            for rep in iterator:
                for variant in ab_order(rep, variants):
                    text, server, rtt = _ask(client, variant, questions[rep], max_new_tokens)
                    answers[variant].append(text)
                    for key in TIMING_KEYS:
                        timings[variant][key].append(float(server[key]))
                    timings[variant]["rtt"].append(rtt)
    except httpx.HTTPError as exc:
        raise CompareError(f"cannot talk to {url}: {exc}") from None

    def paired(key: str) -> float:
        return statistics.median(b / a for a, b in zip(timings[fast][key], timings[slow][key], strict=True) if a > 0)

    stats = []
    for variant in variants:
        gold = [q.answer for q in questions]
        accuracy = None
        if all(g is not None for g in gold):
            accuracy = sum(_same(a, g) for a, g in zip(answers[variant], gold, strict=True)) / len(gold)
        info = served[variant]
        t = timings[variant]
        stats.append(VariantStats(
            variant=variant, model=info.get("model", ""), version=str(info.get("version", "")),
            skipped_layers=list(info.get("skipped_layers", [])),
            inference_ms_p50=statistics.median(t["inference_s"]) * 1e3,
            inference_ms_p90=_percentile(t["inference_s"], 0.9) * 1e3,
            total_ms_p50=statistics.median(t["total_s"]) * 1e3,
            round_trip_ms_p50=statistics.median(t["rtt"]) * 1e3, accuracy=accuracy))
    same = [_same(a, b) for a, b in zip(answers[fast], answers[slow], strict=True)]
    disagreements = [{"question": q.question, fast: a, slow: b}
                     for q, a, b, s in zip(questions, answers[fast], answers[slow], same, strict=True) if not s]
    return CompareReport(
        url=url, requests=len(questions), variants=stats,
        speedup_inference_paired_median=paired("inference_s"),
        speedup_inference_ratio_of_medians=stats[1].inference_ms_p50 / stats[0].inference_ms_p50,
        speedup_total_paired_median=paired("total_s"),
        agreement=sum(same) / len(same), disagreements=disagreements[:10])


def render(report: CompareReport) -> str:
    fast, slow = report.variants
    lines = [f"{report.requests} interleaved requests per variant to {report.url} (batch 1, server-side timings)",
             f"{'variant':<10} {'skipped layers':<15} {'inference p50':>14} {'p90':>9} {'total p50':>10} "
             f"{'round trip p50':>15} {'accuracy':>9}"]
    for s in report.variants:
        acc = "-" if s.accuracy is None else f"{s.accuracy:.1%}"
        lines.append(f"{s.variant:<10} {s.skipped_layers!s:<15} {s.inference_ms_p50:>11.2f} ms "
                     f"{s.inference_ms_p90:>6.2f} ms {s.total_ms_p50:>7.2f} ms "
                     f"{s.round_trip_ms_p50:>12.2f} ms {acc:>9}")
    lines.append(f"speed-up ({slow.variant} / {fast.variant}): inference {report.speedup_inference_paired_median:.3f}x "
                 f"(median of paired ratios; ratio of medians {report.speedup_inference_ratio_of_medians:.3f}x), "
                 f"total {report.speedup_total_paired_median:.3f}x")
    lines.append(f"answer agreement: {report.agreement:.1%} of {report.requests}")
    for d in report.disagreements[:3]:
        lines.append(f"  differs: {json.dumps(d)}")
    return "\n".join(lines)


def compare_command(
    url: Annotated[str, typer.Option(help="base URL of a running eas-serve")] = "http://127.0.0.1:8000",
    requests: Annotated[int, typer.Option(min=1, help="questions asked of each variant (interleaved)")] = 200,
    image: Annotated[Path | None, typer.Option(help="ask about this image instead of easy-vqa test questions")]
    = None,
    question: Annotated[str, typer.Option(help="with --image: the question")] = "what color is the shape?",
    warmup: Annotated[int, typer.Option(min=0, help="unmeasured requests per variant first")] = 5,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="max_new_tokens of every request")] = 8,
    seed: Annotated[int, typer.Option(help="which easy-vqa test questions are drawn")] = 0,
    token: Annotated[str | None, typer.Option(envvar="EAS_API_TOKEN", help="API bearer token")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Compare the served `eas` and `baseline` variants on the same questions: server-side latency and answers."""
    try:
        if image is not None:
            questions = single_question(image, question) * requests
        else:
            questions = easy_vqa_questions(requests, seed)
        report = compare(url, questions, warmup=warmup, max_new_tokens=max_new_tokens, token=token,
                         progress=not as_json)
    except CompareError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else render(report))
