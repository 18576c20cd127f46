"""Adapter training: the optimisation recipe shared by the bandit search (supernet) and stage 2 (§7, §11).

Recipe (eas-method.md §11, LaVIN-EAS defaults): AdamW with β = (0.9, 0.95) and weight decay 0.02 on
weight matrices only (never on biases or norm gains), a linear warm-up followed by a half-cycle cosine
to 0, updated every step, cross-entropy on the answer tokens only.

Learning rate: LaVIN states a *base* rate blr = 9e-3 per 256 samples and scales it linearly with the
effective batch, lr = blr · batch / 256 (1.125e-3 at its batch of 32). We keep that rule, so the default
is `scaled_lr(batch_size)`; `--lr` overrides it. LaVIN warms up for 2 of 20 epochs, hence a warm-up of
10% of the steps.

Only adapter parameters (and the projector when asked) have `requires_grad`; the base is frozen by
`apply_plan`, so an optimizer step can never touch source weights. Every step checks the cancel event.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from eas.conversion.data import VQASample, batches, fixed_batches, to_device, training_batch
from eas.conversion.errors import check_cancel
from eas.model.adapters import PIA, AdapterConfig, RoutedAdapter
from eas.model.convert import apply_plan
from eas.model.plan import SkipPlan
from eas.model.token_reduction import TokenReduction, install_reduction

REFERENCE_BLR = 9e-3  # LaVIN-EAS base lr per 256 samples (eas-method.md §11)
REFERENCE_BATCH = 256

TrainProgress = Callable[[float, str], None]  # (fraction of this phase done, message)


def scaled_lr(batch_size: int, blr: float = REFERENCE_BLR) -> float:
    """The linear scaling rule of the reference: lr = blr · batch / 256."""
    return blr * batch_size / REFERENCE_BATCH


class TrainingConfig(BaseModel):
    """Optimisation settings of one training phase (search or stage 2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float | None = Field(None, gt=0, description="None: scaled_lr(batch_size)")
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    train_projector: bool = False

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else scaled_lr(self.batch_size)


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up to `peak`, then half-cycle cosine to 0 (step is 0-based, one value per step)."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def build_optimizer(named: Sequence[tuple[str, nn.Parameter]], cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only: biases and norm gains are 1-D (or named as norms)."""
    decay, no_decay = [], []
    for name, param in named:
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.peak_lr, betas=cfg.betas)


@dataclass
class TrainingCurve:
    """Loss of every step (training batch) and its mean per epoch; learning rate per step."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    steps_per_epoch: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"loss": self.loss, "lr": self.lr, "epoch_loss": self.epoch_loss,
                "steps_per_epoch": self.steps_per_epoch, "seconds": round(self.seconds, 3)}


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (PIA, RoutedAdapter))]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_adapter_training(model: nn.Module, training: bool) -> None:
    """The base stays in eval mode (frozen, no dropout); only adapters switch (their dropout)."""
    model.eval()
    for module in adapter_modules(model):
        module.train(training)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def run_steps(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[VQASample],
    cfg: TrainingConfig,
    *,
    cancel: threading.Event | None = None,
    progress: TrainProgress | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int, float], None] | None = None,
    description: str = "train",
    show_bar: bool = True,
) -> TrainingCurve:
    """`cfg.steps` optimizer steps over seeded shuffled batches of `samples`.

    `before_step(step)` runs before each forward (the supernet draws its skipped subset there);
    `after_step(step, loss)` after each optimizer step (the bandit updates there).
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("no trainable parameters: apply a plan (or build the supernet) first")
    device, dtype = model_device_dtype(model)
    optimizer = build_optimizer(params, cfg)
    stream: Iterator[list[VQASample]] = batches(samples, cfg.batch_size, cfg.seed)
    curve = TrainingCurve(steps_per_epoch=len(samples) / cfg.batch_size)
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=description, disable=not show_bar, dynamic_ncols=True, leave=False)
    epoch_losses: list[float] = []
    try:
        for step in range(cfg.steps):
            check_cancel(cancel, description)
            lr = lr_at(step, cfg.steps, cfg.peak_lr, cfg.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = to_device(training_batch(processor, next(stream)), device, dtype)
            if before_step is not None:
                before_step(step)
            set_adapter_training(model, True)
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{description}: loss became {value} at step {step}; lower the lr")
            curve.loss.append(value)
            curve.lr.append(lr)
            epoch_losses.append(value)
            if len(epoch_losses) >= curve.steps_per_epoch:
                curve.epoch_loss.append(sum(epoch_losses) / len(epoch_losses))
                epoch_losses = []
            if after_step is not None:
                after_step(step, value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if progress is not None:
                progress((step + 1) / cfg.steps, f"{description} step {step + 1}/{cfg.steps} loss {value:.4f}")
    finally:
        bar.close()
        set_adapter_training(model, False)
    if epoch_losses:  # a partial last epoch still gets its mean
        curve.epoch_loss.append(sum(epoch_losses) / len(epoch_losses))
    curve.seconds = time.perf_counter() - started
    return curve


@torch.no_grad()
def mean_loss(model: PreTrainedModel, processor: ProcessorMixin, samples: Sequence[VQASample],
              batch_size: int = 32, cancel: threading.Event | None = None) -> float:
    """Mean answer-token cross-entropy over `samples` (adapters in eval mode: no dropout)."""
    device, dtype = model_device_dtype(model)
    set_adapter_training(model, False)
    total, count = 0.0, 0
    for chunk in fixed_batches(samples, batch_size):
        check_cancel(cancel, "validation")
        batch = to_device(training_batch(processor, chunk), device, dtype)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch, use_cache=False).loss) * tokens
        count += tokens
    return total / max(count, 1)


@dataclass
class TrainingReport:
    curve: TrainingCurve
    config: TrainingConfig
    trainable_parameters: int
    val_loss_before: float | None
    val_loss_after: float | None

    def to_dict(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "curve": self.curve.to_dict(),
                "trainable_parameters": self.trainable_parameters,
                "val_loss_before": self.val_loss_before, "val_loss_after": self.val_loss_after}


def train_plan(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    plan: SkipPlan,
    adapters: AdapterConfig,
    train: Sequence[VQASample],
    validation: Sequence[VQASample],
    cfg: TrainingConfig,
    *,
    cancel: threading.Event | None = None,
    progress: TrainProgress | None = None,
    show_bar: bool = True,
    reduction: TokenReduction | None = None,
) -> TrainingReport:
    """Stage 2 (§7): convert the *source* model with the plan fixed (in place), then train PIAs and
    kept-layer adapters. Deterministic for a given seed (adapter init, data order, dropout).

    With a `reduction`, the visual-token reduction is installed after the plan (so it is recorded beside it
    in `text_config.eas`) and the adapters train on the reduced prompts they will serve (docs/conversion.md)."""
    check_cancel(cancel, "training")
    device, _ = model_device_dtype(model)
    torch.manual_seed(cfg.seed)  # adapter initialisation and dropout masks
    apply_plan(model, plan, adapters, train_projector=cfg.train_projector)
    if reduction is not None:
        install_reduction(model, reduction)
    model.to(device)
    n_params = sum(p.numel() for _, p in trainable_parameters(model))
    before = mean_loss(model, processor, validation, cancel=cancel) if validation else None
    curve = run_steps(model, processor, train, cfg, cancel=cancel, progress=progress,
                      description="train", show_bar=show_bar)
    after = mean_loss(model, processor, validation, cancel=cancel) if validation else None
    return TrainingReport(curve=curve, config=cfg, trainable_parameters=n_params,
                          val_loss_before=before, val_loss_after=after)
