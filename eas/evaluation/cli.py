"""`eas eval`: accuracy of a model directory or a store version on easy-vqa, optionally against another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from eas.evaluation.harness import agreement, evaluate
from eas.model.loading import LoadedModel, load_model


def _load(spec: str, store: Path) -> LoadedModel:
    """A directory, or `name[:version]` of a model in the store."""
    if Path(spec).is_dir():
        return load_model(spec, device="auto")
    from model_store import ModelStore

    name, _, version = spec.partition(":")
    return ModelStore.open(store).load(name, version or None, device="auto")


def eval_command(
    model: Annotated[str, typer.Argument(help="model directory, or NAME[:VERSION] in the store")],
    against: Annotated[str | None, typer.Option(help="a second model: report answer agreement too")] = None,
    split: Annotated[str, typer.Option(help="easy-vqa split: test or train")] = "test",
    limit: Annotated[int | None, typer.Option(help="first N questions only (default: the whole split)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    store: Annotated[Path, typer.Option(envvar="EAS_MODEL_STORE", help="model store root")] = Path("var/store"),
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Exact-match accuracy on easy-vqa, overall and per question type, with throughput."""
    first = _load(model, store)
    if against is None:
        report = evaluate(first, split, limit, batch_size).to_dict()
    else:
        report = agreement(first, _load(against, store), split, limit, batch_size).to_dict()
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    for label, r in ([("model", report)] if against is None else [("model", report["a"]), ("against", report["b"])]):
        typer.echo(f"{label}: {r['accuracy']:.2%} of {r['total']} ({r['questions_per_s']:.0f} questions/s)")
        for kind, row in r["per_type"].items():
            typer.echo(f"  {kind:<14} {row['accuracy']:.2%} of {row['total']}")
    if against is not None:
        typer.echo(f"agreement: {report['agreement']:.2%} of {report['total']} answers identical")
