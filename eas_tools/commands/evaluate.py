"""`eas eval`: accuracy of a model directory or a store version on easy-vqa or a JSONL dataset, optionally
against a second model.

A bad model path, an unknown store or model, a bad dataset or a wrong option is one `error:` line and
exit code 2 (eas_tools/common.py); the store is only read, never created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from eas_tools.common import EASY_VQA, fail, require_store, resolve_store

if TYPE_CHECKING:
    from eas.model.loading import LoadedModel


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.startswith(".") or Path(spec).exists()


def _check_spec(spec: str, store: Path | None) -> Path | None:
    """Before anything heavy is imported: the model directory, or None for a store model (whose store must
    exist); a path that is not a directory is refused."""
    path = Path(spec)
    if path.is_dir():
        return path
    if _looks_like_path(spec):
        fail(f"model {spec}: {'not a directory' if path.exists() else 'no such directory'} (give a model "
             "directory, or NAME[:VERSION] of a model in the store)")
    require_store(resolve_store(store, create=False)[0], create=False, offers_create=False)
    return None


def _load(spec: str, store: Path | None) -> LoadedModel:
    """A model directory, or `name[:version]` of a model in the store; every failure is one line."""
    from eas.model.loading import load_model  # torch only when a command runs

    path = _check_spec(spec, store)
    if path is not None:
        try:
            return load_model(path, device="auto")
        except Exception as exc:  # whatever transformers raises for a directory that is not a model
            fail(f"cannot load model directory {path}: {exc}")
    from model_store import ModelStore

    root = resolve_store(store, create=False)[0]
    name, _, version = spec.partition(":")
    try:
        info = ModelStore(root).verify(name, version or None)  # every checksum, once: load_model need not
        return load_model(info.path, device="auto", name=info.ref, verify=False)
    except Exception as exc:  # unknown name or version, a corrupted version, unreadable files
        fail(f"model store {root}: {exc}")


def eval_command(
    model: Annotated[str, typer.Argument(help="model directory, or NAME[:VERSION] in the store")],
    dataset: Annotated[str, typer.Option(help=f"'{EASY_VQA}' or a JSONL file of {{image, question, answer}} "
                                              "(image paths relative to the file)")] = EASY_VQA,
    against: Annotated[str | None, typer.Option(help="a second model: report answer agreement too")] = None,
    split: Annotated[str | None, typer.Option(help="easy-vqa split: test (default) or train")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N questions only (default: all)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's; 1 is often "
                                                            "faster on a CPU shared with other work)")] = None,
    store: Annotated[Path | None, typer.Option(help="model store root (default: $EAS_MODEL_STORE, else "
                                                    "var/store); read only")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Exact-match accuracy (per question type on easy-vqa) and throughput; with --against, answer agreement."""
    if dataset == EASY_VQA:
        split = split or "test"
        if split not in ("test", "train"):
            fail(f"unknown split {split!r}: use 'test' or 'train'")
    elif split is not None:
        fail("--split applies to easy-vqa only; a JSONL dataset is evaluated whole (use --limit to shorten it)")
    elif not Path(dataset).is_file():
        fail(f"dataset {dataset}: {'not a file' if Path(dataset).exists() else 'no such file'} (give "
             f"'{EASY_VQA}' or a JSONL file)")

    for spec in (model, against):
        if spec is not None:
            _check_spec(spec, store)

    import torch

    from eas.conversion.data import DatasetError
    from eas.evaluation.harness import agreement_on, evaluate_set, load_eval_set

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = load_eval_set(dataset, split or "test", limit)
    except DatasetError as exc:
        fail(str(exc).splitlines()[0] + (f" (first problem: {exc.errors[0]})" if exc.errors else ""))
    if rows.skipped:
        typer.secho(f"warning: {dataset}: {len(rows.skipped)} unusable rows left out (first: {rows.skipped[0]})",
                    fg=typer.colors.YELLOW, err=True)

    first = _load(model, store)
    if against is None:
        report = evaluate_set(first, rows, batch_size).to_dict()
    else:
        report = agreement_on(first, _load(against, store), rows, batch_size).to_dict()
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    where = dataset if split is None else f"{dataset} {split}"
    for label, r in ([("model", report)] if against is None else [("model", report["a"]), ("against", report["b"])]):
        typer.echo(f"{label}: {r['accuracy']:.2%} of {r['total']} on {where} ({r['questions_per_s']:.0f} "
                   "questions/s)")
        for kind, row in (r["per_type"] or {}).items():
            typer.echo(f"  {kind:<14} {row['accuracy']:.2%} of {row['total']}")
    if against is not None:
        typer.echo(f"agreement: {report['agreement']:.2%} of {report['total']} answers identical")
