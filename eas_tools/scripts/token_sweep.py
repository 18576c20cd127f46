"""Visual-token reduction measured: accuracy and speed-up per criterion × token budget × model (issue 19).

    # accuracy (easy-vqa test split) and batch-1 latency of each cell, training-free reduction
    python -m eas_tools.scripts.token_sweep accuracy --model base=model_store/embedded/easy-vqa-llava \
        --model eas50=model_store/embedded/easy-vqa-llava-eas --limit 2000 --out runs/tokens.json

    # the bench geometry (random weights, 576 image tokens, 12-layer decoder): source, 50%-skipped EAS,
    # each with and without 25% of the image tokens, interleaved; the cost model's prediction beside each,
    # and the combination --target-speedup 2.0 would choose
    python -m eas_tools.scripts.token_sweep bench --out runs/tokens-bench.json

A reduction is installed on the loaded model for a cell and removed after it (`record=False`: nothing is
written); a directory that already records one (a conversion trained with it) is measured as stored with
`--keep stored`. Latency: median of `--runs` interleaved rounds over `--prompts` questions, batch 1, greedy,
`--new-tokens` tokens, every cell timed in each round (the order rotates), against the first model's
unreduced cell. Results and commands: docs/conversion.md and docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from eas.conversion.budget import Budget, measure_cost, measure_token_cost, resolve_token_budget
from eas.conversion.data import VQASample, easy_vqa_test, load_images
from eas.model.generation import generate
from eas.model.loading import LoadedModel, load_model
from eas.model.token_reduction import (
    TokenReduction,
    install_reduction,
    remove_reduction,
    stored_reduction,
    token_reducer,
)

Cell = tuple[str, str, float | None]  # (model name, criterion, keep fraction); keep None = every token


def _timed(loaded: LoadedModel, images: list, questions: list[str], new_tokens: int) -> float:
    batch = loaded.prepare(images, questions)
    start = time.perf_counter()
    generate(loaded.model, batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - start


def _set(loaded: LoadedModel, criterion: str, keep: float | None) -> None:
    stored = loaded.path is not None and stored_reduction(loaded.path) is not None
    if stored:
        return  # measured as trained and stored
    if token_reducer(loaded.model) is not None:
        remove_reduction(loaded.model)
    if keep is not None and keep < 1.0:
        install_reduction(loaded.model, TokenReduction(keep_fraction=keep, criterion=criterion), record=False)


@torch.inference_mode()
def latency(models: dict[str, LoadedModel], cells: list[Cell], samples: list[VQASample], runs: int,
            new_tokens: int) -> dict[Cell, float]:
    prompts = [(load_images([s]), [s.question]) for s in samples]
    times: dict[Cell, list[float]] = {c: [] for c in cells}
    for cell in cells:  # warm-up, untimed
        _set(models[cell[0]], cell[1], cell[2])
        _timed(models[cell[0]], *prompts[0], new_tokens)
    for r in range(runs):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for cell in order:
            loaded = models[cell[0]]
            _set(loaded, cell[1], cell[2])
            for images, questions in prompts:
                times[cell].append(_timed(loaded, images, questions, new_tokens))
    return {c: statistics.median(v) for c, v in times.items()}


def accuracy_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from eas.evaluation.harness import evaluate

    torch.set_num_threads(args.threads)
    models = {name: load_model(path, device="cpu", dtype="fp32", name=name)
              for name, path in (m.split("=", 1) for m in args.model)}
    cells: list[Cell] = []
    for name, loaded in models.items():
        if loaded.path is not None and stored_reduction(loaded.path) is not None:
            reduction = stored_reduction(loaded.path)
            cells.append((name, reduction.criterion, reduction.keep_fraction))
            continue
        cells.append((name, "-", None))
        cells += [(name, c, k) for c in args.criteria for k in args.keeps if k < 1.0]
    rows: list[dict[str, Any]] = []
    for cell in cells:
        loaded = models[cell[0]]
        _set(loaded, cell[1], cell[2])
        started = time.perf_counter()
        report = evaluate(loaded, split="test", limit=args.limit, batch_size=64)
        reducer = token_reducer(loaded.model)
        rows.append({"model": cell[0], "criterion": cell[1], "keep": cell[2] or 1.0,
                     "accuracy": float(report.accuracy), "questions": int(report.total),
                     "prompt_tokens": None if reducer is None else list(reducer.last_prompt_tokens or ()),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    timing = latency(models, cells, easy_vqa_test()[: args.prompts], args.runs, args.new_tokens)
    reference = timing[cells[0]]
    for row, cell in zip(rows, cells, strict=True):
        row["latency_s"] = timing[cell]
        row["speedup"] = reference / timing[cell]
    return {"kind": "accuracy", "args": vars(args), "rows": rows, "load_average": _load()}


def _load() -> list[float]:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The bench geometry: the cost model's predictions against interleaved measurements."""
    from eas.model.adapters import AdapterConfig
    from eas.zoo.llava import BENCH, build_llava
    from eas_tools.bench.flops import count_flops
    from eas_tools.bench.skips import bench_plan
    from eas_tools.bench.variants import convert_and_save

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="eas-token-bench-"))
    model, processor = build_llava(BENCH, seed=0)
    source_dir = root / "source"
    model.save_pretrained(source_dir)
    processor.save_pretrained(source_dir)
    source = load_model(source_dir, device="cpu", dtype="fp32", name="source")
    sample = easy_vqa_test()[0]
    full = measure_cost(source.model, source.processor, sample, new_tokens=args.new_tokens, repeats=args.repeats)
    cost = measure_token_cost(source.model, source.processor, sample, criterion=args.criterion,
                              new_tokens=args.new_tokens, probe_keep=0.25, full=full, rounds=args.rounds)
    layers = full.num_layers
    target = resolve_token_budget(Budget(target_speedup=args.target_speedup), layers, layers - 1, cost, None)
    skip_counts = sorted({layers // 2, target.k})
    models: dict[str, LoadedModel] = {"source": source}
    for k in skip_counts:
        model, processor = build_llava(BENCH, seed=0)
        directory = convert_and_save(model, processor, bench_plan(layers, count=k), root / f"eas{k}")
        models[f"eas{k}"] = load_model(directory, device="cpu", dtype="fp32", name=f"eas{k}")
    cells: list[Cell] = [("source", "-", None), ("source", args.criterion, 0.25)]
    for k in skip_counts:
        cells += [(f"eas{k}", "-", None), (f"eas{k}", args.criterion, 0.25)]
    if target.token_keep not in (None, 1.0, 0.25):
        cells.append((f"eas{target.k}", args.criterion, target.token_keep))
    timing = latency(models, cells, [sample], args.runs, args.new_tokens)
    first = latency(models, cells, [sample], args.runs, 1)  # vision + prefill: the time to the first token
    reference, first_reference = timing[cells[0]], first[cells[0]]
    flops_full = count_flops(source.model.config, full.prompt_tokens, 1)
    rows = []
    for cell in cells:
        k = 0 if cell[0] == "source" else int(cell[0][3:])
        keep = cell[2] or 1.0
        tokens = round(cost.prompt_tokens(keep))
        plan = bench_plan(layers, count=k) if k else None
        flops = count_flops(source.model.config, tokens, 1, skipped=plan.skipped if plan else (),
                            pia_rank=AdapterConfig().pia_rank if plan else 0)
        first_flops = flops_full.vision + flops_full.projector + flops_full.prefill
        rows.append({"model": cell[0], "skipped": k, "criterion": cell[1], "keep": keep, "prompt_tokens": tokens,
                     "latency_s": timing[cell], "measured_speedup": reference / timing[cell],
                     "predicted_speedup": cost.predicted_speedup(k, keep),
                     "first_token_s": first[cell], "first_token_speedup": first_reference / first[cell],
                     "first_token_flop_ratio": first_flops / (flops.vision + flops.projector + flops.prefill),
                     "prefill_flop_ratio": flops_full.prefill / flops.prefill,
                     "target_choice": (k, keep) == (target.k, target.token_keep)})
        print(json.dumps(rows[-1]), flush=True)
    return {"kind": "bench", "args": vars(args), "cost_model": cost.to_dict(), "target": target.to_dict(),
            "rows": rows, "load_average": _load()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--model", action="append", required=True, help="name=directory (repeatable)")
    acc.add_argument("--criteria", nargs="+", default=["cls", "merge", "uniform"])
    acc.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.125])
    acc.add_argument("--limit", type=int, default=None, help="test questions (default: the full split)")
    acc.add_argument("--prompts", type=int, default=3)
    acc.add_argument("--runs", type=int, default=5)
    bench = sub.add_parser("bench")
    bench.add_argument("--criterion", default="cls")
    bench.add_argument("--target-speedup", type=float, default=2.0)
    bench.add_argument("--repeats", type=int, default=3, help="repeats of the first all-token cost model")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the token cost model")
    bench.add_argument("--runs", type=int, default=5)
    for p in (acc, bench):
        p.add_argument("--new-tokens", type=int, default=4)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = accuracy_sweep(args) if args.command == "accuracy" else bench_sweep(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
