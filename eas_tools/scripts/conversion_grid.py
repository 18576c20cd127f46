"""Criterion × skip-fraction grid of real conversions, for the table in docs/conversion.md.

    python -m eas_tools.scripts.conversion_grid --store var/store --model easy-vqa-llava \
        --criteria eas cosine --fractions 0.5 --out runs/grid.jsonl

Each cell is one full `convert()` (search, training, fold, evaluation) written to a scratch `--out`
directory, so the store only ever holds the source; one JSON line per cell is appended to `--out`
(cells already present there are skipped, so an interrupted grid resumes), then a Markdown table of
all cells is printed. `--request '{"preset": "quick"}'` runs a preset's settings (its criterion and
evaluation subset excepted: the grid names the criterion and measures the full split unless --eval-limit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from eas.conversion.pipeline import ConversionRequest, convert
from model_store import ModelStore


def _cell_key(criterion: str, fraction: float) -> str:
    return f"{criterion}@{fraction:g}"


def run_grid(args: argparse.Namespace) -> list[dict]:
    results_path = Path(args.out)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[_cell_key(row["criterion"], row["fraction"])] = row
    for fraction in args.fractions:
        for criterion in args.criteria:
            key = _cell_key(criterion, fraction)
            if key in done:
                continue
            scratch = Path(tempfile.mkdtemp(prefix="eas-grid-"))
            try:
                extra = json.loads(args.request) if args.request else {}
                request = ConversionRequest(
                    store=args.store, model=args.model, criterion=criterion, skip_fraction=fraction,
                    eval_limit=args.eval_limit, seed=args.seed, out=scratch / "model", show_progress_bar=False,
                    **extra,
                )
                started = time.perf_counter()
                result = convert(request, open_store=ModelStore)
                row = {"criterion": criterion, "fraction": fraction, "wall_s": time.perf_counter() - started,
                       **result.summary(), "request": json.loads(request.model_dump_json())}
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            with results_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            done[key] = row
            print(table_row(row), flush=True)
    return list(done.values())


def table_row(row: dict) -> str:
    acc = row["converted_accuracy"]
    src = row["source_accuracy"]
    delta = "" if acc is None else f"{(acc - src) * 100:+.2f}"
    return (f"| {row['criterion']} | {row['fraction']:.0%} | {row['skipped']} | "
            f"{'' if src is None else f'{src:.2%}'} | {'' if acc is None else f'{acc:.2%}'} | {delta} | "
            f"{row['measured_speedup']:.2f}x | {row['predicted_speedup']:.2f}x | {row['wall_s'] / 60:.1f} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--criteria", nargs="+", default=["eas", "cosine", "kl", "recovery", "uniform", "deepest"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request", default="", help="extra ConversionRequest fields as JSON")
    parser.add_argument("--out", default="runs/conversion_grid.jsonl")
    args = parser.parse_args()
    rows = run_grid(args)
    print("| criterion | skip | layers | source acc | converted acc | Δ points | speedup | predicted | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["fraction"], r["criterion"])):
        print(table_row(row))


if __name__ == "__main__":
    main()
