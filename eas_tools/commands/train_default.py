"""`eas train-default`: train the embedded easy-vqa LLaVA (see docs/default-model.md).

`--out` is required and an existing non-empty directory is refused unless `--overwrite` is given, so a
run never replaces the shipped model (model_store/embedded/easy-vqa-llava) by accident. Unset options take
the recipe's values (`eas_tools.demo.train.TrainConfig`), read when the command runs so that `eas --help` does not
import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eas_tools.common import fail

_RECIPE = "default: the recipe's, docs/default-model.md"


def train_default_command(
    out: Annotated[Path, typer.Option(help="output directory (HF format + manifest); to regenerate the shipped "
                                           "model: --out model_store/embedded/easy-vqa-llava --overwrite")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="write into an existing non-empty --out")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help=f"optimizer steps of the cosine schedule ({_RECIPE})")]
    = None,
    minutes: Annotated[float | None, typer.Option(min=0.1, help=f"wall-clock cap ({_RECIPE})")] = None,
    lr: Annotated[float | None, typer.Option(min=0, help=f"stage 2 peak learning rate ({_RECIPE})")] = None,
    images_per_step: Annotated[int | None, typer.Option(min=1, help="stage 2: images per step, with all their "
                                                                    f"questions ({_RECIPE})")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help=f"stage 1: images per step ({_RECIPE})")] = None,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
) -> None:
    """Train the default model from scratch on the easy-vqa train split (the test split is never used)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        fail(f"--out {out} exists and is not empty; pass --overwrite to replace the model in it, or choose "
             "another directory")

    from dataclasses import replace

    from eas_tools.demo.train import TrainConfig, train_default_model  # torch only when training

    chosen = {"steps": steps, "minutes": minutes, "lr": lr, "images_per_step": images_per_step,
              "batch_size": batch_size}
    config = replace(TrainConfig(seed=seed, threads=threads), **{k: v for k, v in chosen.items() if v is not None})
    report = train_default_model(out, config)
    typer.echo(f"{report.steps} steps in {report.seconds:.0f} s, {report.parameters:,} parameters, "
               f"validation accuracy {report.val_accuracy:.2%}; saved to {out}")
