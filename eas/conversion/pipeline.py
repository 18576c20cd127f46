"""One call that converts a stored model: `convert(ConversionRequest(...), progress, cancel)`.

Stages (each reported through `progress` as a `ProgressEvent`):

1. `load`      validate the request and the dataset (bad rows refused before any work), open the store,
               load the source version (checksums verified) and measure the device's cost model;
2. `criterion` resolve the budget to a skip count, score the layers, make the plan (eas-method.md §6, §14);
3. `train`     fresh from the source weights with the plan fixed: PIA + kept-layer adapters (§7 stage 2);
4. `fold`      exact fold, save to a private scratch directory, reload, check logits against the unfolded
               model (§8);
5. `evaluate`  accuracy (easy-vqa: the harness on the test split) and interleaved batch-1 latency,
               source vs converted;
6. `export`    one atomic `add_version` (kind "converted", parent = source) or a fresh `--out` directory.

Nothing is written to the store or `--out` before stage 6, and stage 6 is all-or-nothing, so a failed or
cancelled conversion leaves both unchanged; the source version is only ever read. `cancel` is checked at
every step of every loop; a set event raises `Cancelled`.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from eas.conversion.budget import (
    Budget,
    BudgetDecision,
    CostModel,
    TokenCostModel,
    measure_cost,
    measure_token_cost,
    resolve_budget,
    resolve_token_budget,
)
from eas.conversion.criteria import (
    CriterionContext,
    RecoverySettings,
    SearchSettings,
    available,
    candidate_layers,
    get_criterion,
    run_criterion,
)
from eas.conversion.data import EASY_VQA, ConversionData, load_dataset, load_images
from eas.conversion.errors import Cancelled, ConversionFailed, check_cancel
from eas.conversion.evaluate import Accuracy, Latency, easy_vqa_accuracy, exact_match, interleaved_latency
from eas.conversion.export import FoldCheck, VersionStore, fold_and_save, publish_to_directory, publish_to_store
from eas.conversion.training import TrainingConfig, TrainingReport, mean_loss, train_plan
from eas.model.adapters import AdapterConfig
from eas.model.arch import locate_decoder
from eas.model.loading import LoadedModel, load_model, resolve_device
from eas.model.persistence import is_converted
from eas.model.plan import SkipPlan
from eas.model.token_reduction import TokenReduction, TokenReductionError, check_reducible, parse_token_keep

STAGES = ("load", "criterion", "train", "fold", "evaluate", "export")
DEFAULT_STEPS = 1500  # recovers 75%-skipped demo accuracy (docs/conversion.md); ~2 min on one CPU thread

# Named bundles of defaults. A preset only fills the fields a request leaves out: every field given
# explicitly (CLI option, JSON key) wins, and nested settings merge key by key. Measured in
# docs/conversion.md ("The quick preset").
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        # Rank layers by how well a short training recovers each one (3 x 30 steps on the demo model)
        # instead of a 3,000-step supernet search.
        "criterion": "recovery",
        "recovery": {"steps": 30},
        # A third of the default steps at a higher peak rate: on the demo model 500 steps at 4e-3 recover
        # more than 600-700 steps at the default-scaled 5.6e-4 to 2.5e-3 (docs/conversion.md).
        "steps": 500,
        "lr": 4e-3,
        # The first 1,000 test questions instead of all 9,673 (the summary names the count); `eas eval`
        # measures the stored result on the full split.
        "eval_limit": 1000,
    },
}
# A preset value is not filled when the request sets a field that replaces it.
_PRESET_ALTERNATIVES = {"steps": ("epochs",)}


# Upper bounds on a request's sizes: far above any sensible conversion, low enough that a typo (a batch of
# 10**9 rows, 10**9 threads) is refused when the job is submitted instead of failing or running for hours.
MAX_BATCH_SIZE = 4096
MAX_STEPS = 10_000_000
MAX_EPOCHS = 10_000
MAX_ROWS = 1_000_000
MAX_LATENCY_RUNS = 1000
MAX_NEW_TOKENS = 4096
MAX_THREADS = 1024
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ConversionRequest(BaseModel):
    """Everything a conversion needs; JSON-serialisable, so an admin job can hand it to a worker process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["quick"] | None = Field(None, description="fill the fields not given from this preset "
                                                                "(docs/conversion.md)")
    store: Path
    model: str
    version: str | None = Field(None, description="source version; None = the active one, or its baseline when "
                                 "the active one is a conversion")
    dataset: str = Field(EASY_VQA, description="'easy-vqa' or the path of a JSONL file")
    criterion: str = "eas"
    skip_count: int | None = Field(None, gt=0)
    skip_fraction: float | None = Field(None, gt=0, lt=1)
    target_speedup: float | None = Field(None, gt=1)
    include_layer0: bool = False
    # visual-token reduction (issue 19; docs/conversion.md): a fraction (<= 1) or a count (> 1) of each image's
    # tokens, or "auto" (with target_speedup: planned together with the skip count)
    token_keep: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None
    token_criterion: Literal["cls", "merge", "uniform"] = "cls"
    # training (stage 2)
    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS)
    lr: float | None = Field(None, gt=0, description="None: 9e-3 · batch_size / 256 (the reference's scaling)")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH_SIZE)
    seed: int = 0
    train_projector: bool = False
    adapters: AdapterConfig = Field(default_factory=AdapterConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    # data
    val_size: int = Field(256, gt=0, le=MAX_ROWS,
                          description="held-out rows carved from train (bandit rewards, checks)")
    calibration_samples: int = Field(64, gt=0, le=MAX_ROWS, description="rows for the cosine / kl criteria")
    # measurement
    eval_limit: int | None = Field(None, gt=0, description="test questions for accuracy; None = the full split")
    evaluate_accuracy: bool = True
    latency_runs: int = Field(5, gt=0, le=MAX_LATENCY_RUNS)
    latency_prompts: int = Field(3, gt=0, le=MAX_LATENCY_RUNS)
    latency_new_tokens: int = Field(4, gt=0, le=MAX_NEW_TOKENS)
    # output
    activate: bool = False
    out: Path | None = Field(None, description="write a plain directory here instead of a store version")
    device: str = "auto"
    threads: int | None = Field(None, gt=0, le=MAX_THREADS,
                                description="torch CPU threads for this call; None = leave as is")
    show_progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        defaults = PRESETS.get(data["preset"])
        if defaults is None:  # the Literal field names the choices in its own error
            return data
        filled = dict(data)
        for key, value in defaults.items():
            if key not in filled:
                if not any(filled.get(other) is not None for other in _PRESET_ALTERNATIVES.get(key, ())):
                    filled[key] = value
            elif isinstance(value, dict) and isinstance(filled[key], dict):
                filled[key] = {**value, **filled[key]}
        return filled

    @model_validator(mode="after")
    def _check(self) -> ConversionRequest:
        self.budget()  # exactly one budget
        if self.token_keep == "auto" and self.target_speedup is None:
            raise ValueError("token_keep 'auto' plans the token budget from --target-speedup; give one")
        if isinstance(self.token_keep, float) and self.token_keep > 1 and self.token_keep != int(self.token_keep):
            raise ValueError("token_keep above 1 is a count of tokens and must be a whole number")
        if self.criterion not in available():
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(available())}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device {self.device[:40]!r} is not one of auto, cpu, mps, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this machine has no CUDA device (auto picks what there is)")
        if self.device.startswith("cuda:") and int(self.device[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps': this machine has no MPS device")
        return self

    def budget(self) -> Budget:
        return Budget(count=self.skip_count, fraction=self.skip_fraction, target_speedup=self.target_speedup)

    def token_reduction(self, keep_fraction: float | None = None) -> TokenReduction | None:
        """The requested reduction; with 'auto', the one the planner chose (`keep_fraction`)."""
        if self.token_keep is None:
            return None
        keep = keep_fraction if self.token_keep == "auto" else self.token_keep
        return None if keep is None else parse_token_keep(keep, self.token_criterion)

    def training_steps(self, train_rows: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * train_rows / self.batch_size))
        return DEFAULT_STEPS


@dataclass(frozen=True)
class ProgressEvent:
    """`fraction` is the whole conversion's progress (0..1); `stage_fraction` that of the current stage."""

    stage: str
    fraction: float
    message: str
    stage_fraction: float = 0.0


@dataclass
class ConversionResult:
    model: str
    source_version: str
    version: str | None  # the new store version; None with `out`
    path: str
    plan: SkipPlan
    budget: BudgetDecision
    cost_model: CostModel
    training: TrainingReport
    source_val_loss: float
    fold_check: FoldCheck
    source_accuracy: Accuracy | None
    converted_accuracy: Accuracy | None
    latency: Latency
    criterion_details: dict[str, Any] = field(default_factory=dict)
    skipped_rows: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    token_reduction: TokenReduction | None = None
    token_cost: TokenCostModel | None = None
    prompt_tokens: tuple[int, int] | None = None  # (source, converted) of the probe prompt

    @property
    def accuracy_delta(self) -> float | None:
        if self.source_accuracy is None or self.converted_accuracy is None:
            return None
        return self.converted_accuracy.accuracy - self.source_accuracy.accuracy

    def summary(self) -> dict[str, Any]:
        """The compact, JSON-ready facts (store metadata, job results, CLI output)."""
        return {
            "model": self.model, "source_version": self.source_version, "version": self.version,
            "path": self.path, "criterion": self.plan.criterion, "skipped": list(self.plan.skipped),
            "num_layers": self.plan.num_layers, "skip_fraction": self.plan.skip_fraction,
            "predicted_speedup": self.budget.predicted_speedup,
            "measured_speedup": self.latency.speedup,
            "source_latency_s": self.latency.source_s, "converted_latency_s": self.latency.converted_s,
            "source_accuracy": None if self.source_accuracy is None else self.source_accuracy.accuracy,
            "converted_accuracy": None if self.converted_accuracy is None else self.converted_accuracy.accuracy,
            "accuracy_delta": self.accuracy_delta,
            "accuracy_split": None if self.converted_accuracy is None else self.converted_accuracy.split,
            "accuracy_questions": None if self.converted_accuracy is None else self.converted_accuracy.total,
            "train_steps": self.training.config.steps, "final_train_loss": self.training.curve.loss[-1],
            "source_val_loss": self.source_val_loss, "val_loss_before": self.training.val_loss_before,
            "val_loss_after": self.training.val_loss_after,
            "fold_relative_diff": self.fold_check.relative_diff,
            "skipped_rows": len(self.skipped_rows),
            "token_reduction": None if self.token_reduction is None else self.token_reduction.model_dump(mode="json"),
            "prompt_tokens": None if self.prompt_tokens is None else list(self.prompt_tokens),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
            "total_seconds": round(self.total_seconds, 2),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (conversion.json)."""
        return {
            "summary": self.summary(),
            "plan": self.plan.model_dump(mode="json"),
            "budget": self.budget.to_dict(),
            "cost_model": self.cost_model.to_dict(),
            "training": self.training.to_dict(),
            "source_val_loss": self.source_val_loss,
            "fold_check": self.fold_check.to_dict(),
            "source_accuracy": None if self.source_accuracy is None else self.source_accuracy.to_dict(),
            "converted_accuracy": None if self.converted_accuracy is None else self.converted_accuracy.to_dict(),
            "latency": self.latency.to_dict(),
            "criterion_details": self.criterion_details,
            "skipped_rows": self.skipped_rows,
            "token_cost": None if self.token_cost is None else self.token_cost.to_dict(),
        }


class _Progress:
    """Maps (stage, stage fraction) to the overall fraction with rough per-stage weights."""

    def __init__(self, callback: Callable[[ProgressEvent], None] | None, criterion: str) -> None:
        self.callback = callback
        weights = {"load": 0.03, "criterion": 0.04, "train": 0.6, "fold": 0.03, "evaluate": 0.28, "export": 0.02}
        if criterion == "eas":
            weights["criterion"] = 0.35
        elif criterion == "recovery":
            weights["criterion"] = 0.15
        total = sum(weights.values())
        self.start: dict[str, float] = {}
        acc = 0.0
        for stage in STAGES:
            self.start[stage] = acc / total
            acc += weights[stage]
        self.weight = {s: w / total for s, w in weights.items()}

    def __call__(self, stage: str, stage_fraction: float, message: str) -> None:
        if self.callback is None:
            return
        overall = self.start[stage] + self.weight[stage] * min(max(stage_fraction, 0.0), 1.0)
        self.callback(ProgressEvent(stage=stage, fraction=min(overall, 1.0), message=message,
                                    stage_fraction=stage_fraction))

    def stage(self, stage: str) -> Callable[[float, str], None]:
        return lambda fraction, message: self(stage, fraction, message)


def _accuracy(loaded: LoadedModel, data: ConversionData, request: ConversionRequest,
              cancel: threading.Event | None) -> Accuracy:
    if data.is_easy_vqa:
        return easy_vqa_accuracy(loaded, limit=request.eval_limit, cancel=cancel)
    rows = data.validation if request.eval_limit is None else data.validation[: request.eval_limit]
    return exact_match(loaded, rows, cancel=cancel, split="validation")


def convert(request: ConversionRequest, progress: Callable[[ProgressEvent], None] | None = None,
            cancel: threading.Event | None = None, *,
            open_store: Callable[[Path], VersionStore]) -> ConversionResult:
    """Run a whole conversion (see the module docstring). Raises DatasetError, ConversionFailed,
    Cancelled or the store's errors (NotFound, ...); in every such case nothing was written.
    `open_store` opens `request.store` once the dataset is accepted: `model_store.ModelStore`, or an opener
    that also seeds a new store (`eas convert --create-store`); the library never imports the store itself."""
    if request.threads is None:
        return _convert(request, progress, cancel, open_store)
    # On a shared CPU, fewer threads than cores can be many times faster: OpenMP workers that wait for a
    # busy core stall every small matmul (docs/conversion.md). Restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(request.threads)
    try:
        return _convert(request, progress, cancel, open_store)
    finally:
        torch.set_num_threads(previous)


def _convert(request: ConversionRequest, progress: Callable[[ProgressEvent], None] | None,
             cancel: threading.Event | None, open_store: Callable[[Path], VersionStore]) -> ConversionResult:
    started = time.perf_counter()
    report = _Progress(progress, request.criterion)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    # --- load ---------------------------------------------------------------------------------------------
    report("load", 0.0, f"reading dataset {request.dataset}")
    data = load_dataset(request.dataset, val_size=request.val_size, seed=request.seed)  # DatasetError first
    if not data.validation:
        raise ConversionFailed(f"{request.dataset}: too few rows to hold out validation rows (need at least 5)")
    budget = request.budget()
    criterion = get_criterion(request.criterion)
    check_cancel(cancel, "load")
    store = open_store(request.store)
    source_info = store.conversion_source(request.model, request.version)
    if is_converted(source_info.path):
        raise ConversionFailed(f"{source_info.ref} is already converted; convert its baseline instead")
    if request.out is not None and Path(request.out).exists() and any(Path(request.out).iterdir()):
        raise ConversionFailed(f"{request.out} already exists and is not empty")
    device = resolve_device(request.device)
    report("load", 0.3, f"loading {source_info.ref}")
    store.verify(request.model, source_info.version)  # every checksum, once for both loads
    source = load_model(source_info.path, device=device, dtype=torch.float32, name=source_info.ref, verify=False)
    work = load_model(source_info.path, device=device, dtype=torch.float32, name=source_info.ref, verify=False).model
    processor = source.processor
    num_layers = locate_decoder(work).num_layers
    candidates = candidate_layers(num_layers, request.include_layer0)
    report("load", 0.5, "validation loss of the source model")
    source_val_loss = mean_loss(work, processor, data.validation, cancel=cancel)
    report("load", 0.7, "measuring the per-layer cost model")
    cost = measure_cost(work, processor, data.validation[0], new_tokens=request.latency_new_tokens)
    token_cost: TokenCostModel | None = None
    try:
        if request.token_keep is None:
            decision = resolve_budget(budget, num_layers, len(candidates), cost)
        else:
            # Refused families fail here, before any training (eas/model/token_reduction.py REFUSED).
            check_reducible(work, request.token_reduction(1.0))
            report("load", 0.85, "measuring the cost model with fewer image tokens")
            token_cost = measure_token_cost(work, processor, data.validation[0], criterion=request.token_criterion,
                                            new_tokens=request.latency_new_tokens, full=cost)
            fixed = request.token_reduction()
            keep = None if fixed is None else (
                fixed.keep_fraction if fixed.keep_fraction is not None
                else fixed.kept(token_cost.image_tokens) / max(token_cost.image_tokens, 1))
            decision = resolve_token_budget(budget, num_layers, len(candidates), token_cost, keep)
    except (ValueError, TokenReductionError) as exc:
        raise ConversionFailed(str(exc)) from exc
    reduction = request.token_reduction(decision.token_keep)
    report("load", 1.0, f"{budget.describe()}: skip {decision.k}/{num_layers}, "
                        f"predicted {decision.predicted_speedup:.2f}x on {cost.device}")
    lap("load")

    # --- criterion ----------------------------------------------------------------------------------------
    check_cancel(cancel, "criterion")
    report("criterion", 0.0, f"criterion {criterion.name}")
    ctx = CriterionContext(
        model=work, processor=processor, num_layers=num_layers, candidates=candidates, k=decision.k, data=data,
        seed=request.seed, calibration_samples=request.calibration_samples, batch_size=request.batch_size,
        lr=request.lr, adapters=request.adapters, search=request.search, recovery=request.recovery, cancel=cancel,
        progress=report.stage("criterion"), show_bar=request.show_progress_bar,
    )
    chosen = run_criterion(request.criterion, ctx)
    plan = chosen.plan
    report("criterion", 1.0, f"plan: skip {list(plan.skipped)}")
    lap("criterion")

    # --- train --------------------------------------------------------------------------------------------
    check_cancel(cancel, "train")
    cfg = TrainingConfig(steps=request.training_steps(len(data.train)), batch_size=request.batch_size,
                         lr=request.lr, seed=request.seed, train_projector=request.train_projector)
    report("train", 0.0, f"training {cfg.steps} steps at lr {cfg.peak_lr:.3g}")
    training = train_plan(work, processor, plan, request.adapters, data.train, data.validation, cfg,
                          cancel=cancel, progress=report.stage("train"), show_bar=request.show_progress_bar,
                          reduction=reduction)
    lap("train")

    with tempfile.TemporaryDirectory(prefix="eas-convert-") as scratch:
        # --- fold -----------------------------------------------------------------------------------------
        check_cancel(cancel, "fold")
        report("fold", 0.0, "folding adapters into the FFN and Q/K/V weights")
        probe_rows = data.validation[:4]
        probe = LoadedModel(model=work, processor=processor, device=device, dtype=torch.float32)
        converted, fold_check = fold_and_save(work, processor, probe, load_images(probe_rows),
                                              [r.question for r in probe_rows], Path(scratch) / "model")
        del work, probe
        report("fold", 1.0, f"fold verified (relative logit difference {fold_check.relative_diff:.2e})")
        lap("fold")

        # --- evaluate -------------------------------------------------------------------------------------
        check_cancel(cancel, "evaluate")
        source_acc = converted_acc = None
        if request.evaluate_accuracy:
            report("evaluate", 0.0, "accuracy of the source model")
            source_acc = _accuracy(source, data, request, cancel)
            report("evaluate", 0.4, f"source accuracy {source_acc.accuracy:.2%}; now the converted model")
            converted_acc = _accuracy(converted, data, request, cancel)
            report("evaluate", 0.8, f"converted accuracy {converted_acc.accuracy:.2%}; timing")
        latency = interleaved_latency(source, converted, data.validation[: request.latency_prompts],
                                      runs=request.latency_runs, new_tokens=request.latency_new_tokens,
                                      cancel=cancel)
        report("evaluate", 1.0, f"latency {latency.source_s * 1e3:.1f} -> {latency.converted_s * 1e3:.1f} ms "
                                f"({latency.speedup:.2f}x)")
        lap("evaluate")

        # --- export ---------------------------------------------------------------------------------------
        check_cancel(cancel, "export")
        result = ConversionResult(
            model=request.model, source_version=source_info.version, version=None, path="", plan=plan,
            budget=decision, cost_model=cost, training=training, source_val_loss=source_val_loss,
            fold_check=fold_check,
            source_accuracy=source_acc, converted_accuracy=converted_acc, latency=latency,
            criterion_details=chosen.details, skipped_rows=[str(e) for e in data.skipped],
            stage_seconds=seconds, total_seconds=time.perf_counter() - started,
            token_reduction=reduction, token_cost=token_cost, prompt_tokens=_prompt_tokens(converted),
        )
        record = {"request": request.model_dump(mode="json"), **result.to_dict()}
        model_dir = Path(scratch) / "model"
        report("export", 0.0, "writing the converted model")
        if request.out is not None:
            path = publish_to_directory(Path(request.out), model_dir, plan.to_json(), record, cancel)
            result.path = str(path)
        else:
            info = publish_to_store(store, request.model, source_info, model_dir, plan.to_json(), record,
                                    metadata=_metadata(request, result), activate=request.activate, cancel=cancel)
            result.version, result.path = info.version, str(info.path)
        lap("export")
    result.stage_seconds = seconds
    result.total_seconds = time.perf_counter() - started
    report("export", 1.0, f"done in {result.total_seconds:.0f}s: {result.path}")
    return result


def _prompt_tokens(converted: LoadedModel) -> tuple[int, int] | None:
    """(before, after) prompt tokens of the last prompt the converted model ran (its reduction's count)."""
    from eas.model.token_reduction import token_reducer

    reducer = token_reducer(converted.model)
    return None if reducer is None else reducer.last_prompt_tokens


def _metadata(request: ConversionRequest, result: ConversionResult) -> dict[str, Any]:
    """Small, queryable facts for the registry row (the full record is conversion.json in the version)."""
    meta = result.summary()
    for key in ("path", "version", "model"):
        meta.pop(key, None)
    meta.update(preset=request.preset, dataset=request.dataset, seed=request.seed, lr=result.training.config.peak_lr,
                batch_size=request.batch_size)
    return meta


__all__ = ["Cancelled", "ConversionFailed", "ConversionRequest", "ConversionResult", "ProgressEvent", "convert"]
