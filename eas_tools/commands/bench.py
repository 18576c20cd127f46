"""`eas bench`: the command-line face of `eas_tools.bench.run.run_bench`.

Unset options take their defaults (or `--quick`'s CI-sized ones); a setup problem (unknown geometry, a GPU-
only geometry on a CPU, a wrong combination of model options) is one message and exit code 2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def _ints(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(x) for x in text.replace(" ", "").split(",") if x)


def bench_command(
    out: Annotated[Path, typer.Option(help="directory for bench.json, summary.md and the plots")]
    = Path("var/bench"),
    geometry: Annotated[str | None, typer.Option(help="random-weight geometry: tiny | bench | llava-1.5-7b "
                                                      "(default bench)")] = None,
    skip_fraction: Annotated[float | None, typer.Option(help="fraction of attention layers the EAS variant "
                                                             "skips (default 0.5)")] = None,
    skip_count: Annotated[int | None, typer.Option(help="skip this many attention layers instead")] = None,
    placement: Annotated[str | None, typer.Option(help="deepest | even (layer 0 is always kept)")] = None,
    eas_dir: Annotated[Path | None, typer.Option(help="benchmark this converted model directory ...")] = None,
    baseline_dir: Annotated[Path | None, typer.Option(help="... against this baseline directory")] = None,
    store: Annotated[Path | None, typer.Option(help="model store: benchmark a converted version vs its parent")]
    = None,
    model: Annotated[str | None, typer.Option(help="model name in --store")] = None,
    version: Annotated[str | None, typer.Option(help="converted version in --store (default: the active one)")]
    = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (auto: CUDA when present)")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (auto: bf16 on GPU)")] = None,
    reps: Annotated[int | None, typer.Option(help="interleaved repetitions at batch 1 (default 10)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="the batched size (default 8; 1 = batch 1 only)")] = None,
    batched_reps: Annotated[int | None, typer.Option(help="repetitions at the batched size (default 3)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens generated per request (default 8)")] = None,
    concurrency: Annotated[str | None, typer.Option(help="client counts for throughput (default 1,2,4,8,16)")]
    = None,
    requests_per_level: Annotated[int | None, typer.Option(help="requests per client count and variant "
                                                                "(default 16)")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="the service's batch window (default 5, the "
                                                             "service default)")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="also measure latency vs skip fraction")] = False,
    sweep_fractions: Annotated[str | None, typer.Option(help="fractions for --sweep (default 0,0.25,0.5,0.75)")]
    = None,
    sweep_reps: Annotated[int | None, typer.Option(help="repetitions per sweep point (default 5)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the random weights")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CI-sized run (few repetitions, batch 2, 4 tokens)")]
    = False,
    allow_large_on_cpu: Annotated[bool, typer.Option("--allow-large-on-cpu", help="build a GPU-only geometry "
                                                                                   "on the CPU anyway")] = False,
    keep_models: Annotated[bool, typer.Option("--keep-models", help="keep the built model directories in --out")]
    = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
) -> None:
    """Baseline vs EAS in one interleaved run: raw and HTTP latency, overhead, throughput, memory, FLOPs."""
    from eas_tools.bench.run import resolve_options, run_bench, validate
    from eas_tools.bench.variants import BenchSetupError

    try:
        options = resolve_options(
            out, quick=quick, geometry=geometry, skip_fraction=skip_fraction, skip_count=skip_count,
            placement=placement, eas_dir=eas_dir, baseline_dir=baseline_dir, store=store, model=model,
            version=version, device=device, dtype=dtype, reps=reps, batch_size=batch_size,
            batched_reps=batched_reps, max_new_tokens=max_new_tokens, concurrency=_ints(concurrency),
            requests_per_level=requests_per_level, batch_wait_ms=batch_wait_ms, sweep=sweep or None,
            sweep_fractions=_floats(sweep_fractions), sweep_reps=sweep_reps, threads=threads, seed=seed,
            allow_large_on_cpu=allow_large_on_cpu or None, keep_models=keep_models or None,
            progress=False if no_progress else None, command=["eas", *map(shlex.quote, sys.argv[1:])])
        validate(options)
    except (BenchSetupError, ValueError) as exc:  # a bad combination of options: nothing has run yet
        _fail(str(exc))
    if store is not None:  # benchmarking never creates (and seeds) a store at a mistyped path
        from eas_tools.common import require_store

        require_store(store, create=False, offers_create=False)
    try:
        run_bench(options)
    except BenchSetupError as exc:  # e.g. a store version that is not there: found before any measurement
        _fail(str(exc))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
