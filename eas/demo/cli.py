"""`eas train-default`: train the embedded easy-vqa LLaVA (see docs/default-model.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eas.demo.train import TrainConfig, train_default_model

EMBEDDED = Path(__file__).resolve().parents[2] / "model_store" / "embedded" / "easy-vqa-llava"


def train_default_command(
    out: Annotated[Path, typer.Option(help="output directory (HF format + manifest)")] = EMBEDDED,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps of the cosine schedule")] = TrainConfig.steps,
    minutes: Annotated[float, typer.Option(min=0.1, help="wall-clock cap")] = TrainConfig.minutes,
    lr: Annotated[float, typer.Option(min=0)] = TrainConfig.lr,
    images_per_step: Annotated[int, typer.Option(min=1, help="stage 2: images per step, with all their questions")] = (
        TrainConfig.images_per_step),
    batch_size: Annotated[int, typer.Option(min=1, help="stage 1: images per step")] = TrainConfig.batch_size,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
) -> None:
    """Train the default model from scratch on the easy-vqa train split (the test split is never used)."""
    report = train_default_model(out, TrainConfig(
        steps=steps, minutes=minutes, lr=lr, images_per_step=images_per_step, batch_size=batch_size, seed=seed,
        threads=threads))
    typer.echo(f"{report.steps} steps in {report.seconds:.0f} s, {report.parameters:,} parameters, "
               f"validation accuracy {report.val_accuracy:.2%}; saved to {out}")
