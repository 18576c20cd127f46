"""`eas convert`: the command-line face of `eas.conversion.pipeline.convert`.

Every option maps one-to-one onto a `ConversionRequest` field, so the CLI and the admin job run the same
conversion. Errors are printed as one clear message (exit 2 for a bad request, dataset, store or model
name, 1 for a failed conversion, 130 when interrupted); nothing is written in any of those cases. `--store`
must be an existing model store unless `--create-store` is given (then it is created and seeded with the
embedded model), so a mistyped path never starts a conversion in a new store. Only typer and the standard
library are imported at module level: `eas --help` imports this module (eas_tools/cli.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from eas.conversion.errors import Cancelled, ConversionFailed
from eas_tools.common import EASY_VQA, require_store, store_exists

if TYPE_CHECKING:
    from pydantic import ValidationError


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _token_keep(value: str | None) -> float | str | None:
    """--token-keep as the request field: 'auto', or a number (a percentage becomes a fraction)."""
    if value is None or value == "auto":
        return value
    text = value.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        _fail(f"--token-keep {value!r}: give a fraction (0.25), a percentage (25%), a count (16) or 'auto'", 2)
        raise  # unreachable: _fail exits


def _describe_tokens(reduction: dict) -> str:
    budget = (f"{reduction['keep_fraction']:.1%}" if reduction["keep_fraction"] is not None
              else str(reduction["keep_count"]))
    return f"keep {budget} per image by {reduction['criterion']}"


def convert_command(
    store: Annotated[Path, typer.Option(help="model store directory (must exist; see --create-store)")],
    model: Annotated[str, typer.Option(help="model name in the store")],
    dataset: Annotated[str, typer.Option(help=f"'{EASY_VQA}' or a JSONL file of {{image, question, answer}}")]
    = EASY_VQA,
    criterion: Annotated[str | None, typer.Option(help="eas | cosine | kl | recovery | uniform | deepest "
                                                       "(default eas, or the preset's)")] = None,
    preset: Annotated[str | None, typer.Option(help="quick: recovery criterion with 30-step probes, 500 steps at "
                                                    "lr 4e-3, accuracy on 1,000 test questions; options given "
                                                    "explicitly still win (docs/conversion.md)")] = None,
    version: Annotated[str | None, typer.Option(help="source version (default: the active one, or its baseline when "
                                                           "the active one is a conversion)")] = None,
    skip_count: Annotated[int | None, typer.Option(help="skip this many attention layers")] = None,
    skip_fraction: Annotated[float | None, typer.Option(help="skip this fraction of the attention layers")] = None,
    target_speedup: Annotated[float | None, typer.Option(help="skip the fewest layers predicted to reach this "
                                                                "latency speedup on this device")] = None,
    token_keep: Annotated[str | None, typer.Option(help="visual tokens kept per image: a fraction (0.25), a "
                                                     "percentage (25%), a count (16), or 'auto' (planned with "
                                                     "--target-speedup); default: all (docs/conversion.md)")]
    = None,
    token_criterion: Annotated[str | None, typer.Option(help="which image tokens to keep: cls | merge | uniform "
                                                             "(default cls)")] = None,
    steps: Annotated[int | None, typer.Option(help="training steps (default 1500)")] = None,
    epochs: Annotated[float | None, typer.Option(help="training epochs (instead of --steps)")] = None,
    search_steps: Annotated[int | None, typer.Option(help="supernet steps of the eas search (default 3000)")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default 9e-3 * batch / 256)")] = None,
    batch_size: Annotated[int, typer.Option(help="training batch size")] = 16,
    seed: Annotated[int, typer.Option(help="seed of data order, adapter init and bandit draws")] = 0,
    eval_limit: Annotated[int | None, typer.Option(help="test questions for accuracy (default: all)")] = None,
    no_accuracy: Annotated[bool, typer.Option("--no-accuracy", help="skip the accuracy measurement")] = False,
    include_layer0: Annotated[bool, typer.Option(help="allow skipping layer 0's attention")] = False,
    activate: Annotated[bool, typer.Option("--activate/--no-activate", help="serve the new version")] = False,
    out: Annotated[Path | None, typer.Option(help="write a plain directory here instead of a store version")]
    = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's; 1 is often faster on "
                                                     "a CPU shared with other work)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the full result as JSON")] = False,
    create_store: Annotated[bool, typer.Option("--create-store", help="create --store (seeded with the embedded "
                                                                      "model) if it does not exist")] = False,
) -> None:
    """Convert a stored model: choose the attention layers to skip, train the adapters, fold, evaluate, store."""
    from pydantic import ValidationError

    from eas.conversion.data import DatasetError
    from eas.conversion.pipeline import ConversionRequest, ProgressEvent, convert  # torch only when running
    from model_store import ModelStore, NotFound, StoreError
    from service.seed import open_seeded

    search = {} if search_steps is None else {"steps": search_steps}
    try:
        fields = dict(
            store=store, model=model, version=version, dataset=dataset, criterion=criterion,
            skip_count=skip_count, skip_fraction=skip_fraction, target_speedup=target_speedup,
            steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, eval_limit=eval_limit,
            evaluate_accuracy=not no_accuracy, include_layer0=include_layer0, activate=activate, out=out,
            device=device, threads=threads, search=search, preset=preset,
            token_keep=_token_keep(token_keep), token_criterion=token_criterion,
        )
        # An option left out is not passed at all, so the preset (or the field's own default) fills it.
        request = ConversionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        _fail(_validation_message(exc), 2)
    require_store(store, create=create_store)
    if store_exists(store):  # a wrong model or version is a bad argument, refused before the dataset is read
        try:
            ModelStore(store).get_version(model, version)
        except NotFound as exc:
            _fail(str(exc), 2)

    def show(event: ProgressEvent) -> None:
        if " step " in event.message and event.stage_fraction < 1.0:
            return  # training steps have their own tqdm bar (loss, ETA)
        typer.echo(f"[{event.fraction:5.1%}] {event.stage:9s} {event.message}", err=True)

    try:
        result = convert(request, progress=show, open_store=open_seeded)  # an empty store gets the demo model
    except DatasetError as exc:
        _fail(str(exc), 2)
    except (ConversionFailed, StoreError, ValueError) as exc:
        _fail(str(exc), 1)
    except (Cancelled, KeyboardInterrupt):
        typer.secho("cancelled: nothing was written", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None

    if as_json:
        json.dump(result.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    s = result.summary()
    where = f"{s['model']}:{s['version']}" if s["version"] else s["path"]
    typer.echo(f"converted {s['model']}:{s['source_version']} -> {where}")
    typer.echo(f"  criterion      {s['criterion']}; skipped {s['skipped']} of {s['num_layers']} "
               f"({s['skip_fraction']:.0%})")
    if s["converted_accuracy"] is not None:
        typer.echo(f"  accuracy       {s['source_accuracy']:.2%} -> {s['converted_accuracy']:.2%} "
                   f"({s['accuracy_delta'] * 100:+.2f} points, {s['accuracy_questions']} {s['accuracy_split']} "
                   "questions)")
    typer.echo(f"  latency        {s['source_latency_s'] * 1e3:.1f} -> {s['converted_latency_s'] * 1e3:.1f} ms "
               f"(speedup {s['measured_speedup']:.2f}x measured, {s['predicted_speedup']:.2f}x predicted)")
    if s["token_reduction"] is not None:
        before, after = s["prompt_tokens"] or (None, None)
        tokens = "" if before is None else f"; prompt {before} -> {after} tokens"
        typer.echo(f"  image tokens   {_describe_tokens(s['token_reduction'])}{tokens}")
    typer.echo(f"  training       {s['train_steps']} steps; held-out loss {s['val_loss_before']:.4f} (untrained "
               f"adapters) -> {s['val_loss_after']:.4f} (source model {s['source_val_loss']:.4f})")
    typer.echo(f"  fold check     relative logit difference {s['fold_relative_diff']:.1e}")
    if result.skipped_rows:
        typer.echo(f"  skipped rows   {len(result.skipped_rows)}:")
        for row in result.skipped_rows[:20]:
            typer.echo(f"    {row}")
    typer.echo(f"  time           {s['total_seconds']:.0f} s " + ", ".join(
        f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items()))
