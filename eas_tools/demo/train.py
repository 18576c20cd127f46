"""Train the embedded default model: `eas train-default [--out DIR] [--seed S] [--minutes M]`.

A LLaVA (CLIP-style vision tower, projector, Llama decoder) built from `DEMO` and trained from scratch on
the easy-vqa train split in two stages: stage 1 pretrains the vision tower on the images' shape and
colour (eas_tools/demo/vision_pretrain.py); stage 2 freezes it and trains projector and decoder on the
questions, loss on the answer token and EOS only, in batches grouped by image (eas_tools/demo/grouped.py).
AdamW with linear warm-up and cosine decay; tqdm bars, validation accuracy every `eval_every` steps; the
wall-clock cap ends training early (the cosine schedule is laid out for `steps`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eas.manifest import write_manifest
from eas.model.loading import LoadedModel
from eas.zoo.llava import DEMO, LlavaGeometry, build_llava
from eas_tools.demo.data import EasyVQATensors, corpus, load_train_tensors
from eas_tools.demo.grouped import grouped_loss, questions_by_image, shared_prefix_length
from eas_tools.demo.optim import adamw, warmup_cosine
from eas_tools.demo.vision_pretrain import VisionPretrainConfig, image_labels, pretrain_vision_tower


@dataclass
class TrainConfig:
    steps: int = 2000
    images_per_step: int = 16  # stage 2: every question of these images (~12 each), see eas_tools/demo/grouped.py
    batch_size: int = 64  # stage 1 images per step
    lr: float = 1e-3  # stage 2 (at 2e-3 the yes/no colour questions grounded ~800 steps later)
    vision_lr: float = 2e-3  # stage 1
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    minutes: float = 20.0  # a safety cap; the shipped model stops at `steps` (reproducible)
    eval_every: int = 500
    val_rows: int = 400  # periodic checks
    final_val_rows: int | None = None  # the end-of-training check (None: every held-out row)
    threads: int = 0  # 0: torch's default
    vision_steps: int = 1500  # stage 1 (see eas_tools/demo/vision_pretrain.py); 0 skips it
    freeze_vision: bool = True  # stage 2 trains projector + decoder only, as LLaVA does


@dataclass
class TrainReport:
    config: dict
    geometry: dict
    steps: int
    seconds: float
    parameters: int
    val_accuracy: float
    loss_curve: list[float] = field(default_factory=list)
    vision_loss_curve: list[float] = field(default_factory=list)


def _stage_one(model: torch.nn.Module, data: EasyVQATensors, cfg: TrainConfig) -> list[float]:
    """Pretrain the vision tower on the shape and colour of the training images (validation images held out)."""
    if not cfg.vision_steps:
        return []
    train_images = [data.image_ids[k] for k in data.train.image_index.tolist()]
    labels = image_labels(data.train.questions, data.train.answers, train_images)
    rows = sorted({k for k, i in enumerate(data.image_ids) if i in labels})
    shape = torch.tensor([labels[data.image_ids[k]][0] for k in rows])
    color = torch.tensor([labels[data.image_ids[k]][1] for k in rows])
    stage = VisionPretrainConfig(steps=cfg.vision_steps, batch_size=cfg.batch_size, lr=cfg.vision_lr,
                                 seed=cfg.seed)
    return pretrain_vision_tower(model.model.vision_tower, data.pixels[rows], shape, color, stage)


@torch.inference_mode()
def validation_accuracy(model, processor, data: EasyVQATensors, rows: int) -> float:
    """Greedy answers through LoadedModel (exactly how the model is served) on held-out train images."""
    was_training = model.training
    model.eval()
    loaded = LoadedModel(model=model, processor=processor)
    split = data.validation
    picked = list(range(min(rows, len(split))))
    correct = 0
    for start in range(0, len(picked), 100):
        chunk = picked[start : start + 100]
        images = [_to_image(data.pixels[split.image_index[r]], processor) for r in chunk]
        answers = loaded.answer(images, [split.questions[r] for r in chunk], max_new_tokens=3)
        correct += sum(a == split.answers[r] for a, r in zip(answers, chunk, strict=True))
    model.train(was_training)
    return correct / max(len(picked), 1)


def _to_image(pixels: torch.Tensor, processor):
    """Undo the processor's normalisation (exact to 8 bits) so validation goes through the real path."""
    from PIL import Image

    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    array = ((pixels * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def train_default_model(out: Path, cfg: TrainConfig | None = None, geometry: LlavaGeometry = DEMO) -> TrainReport:
    cfg = cfg or TrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, processor = build_llava(geometry, seed=cfg.seed, corpus=corpus())
    _check_single_token_answers(processor)
    torch.manual_seed(cfg.seed)
    data = load_train_tensors(processor, seed=cfg.seed)
    started = time.monotonic()
    vision_curve = _stage_one(model, data, cfg)
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    opt = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    order = random.Random(cfg.seed)
    images = sorted(questions_by_image(data.train).items())
    prefix = shared_prefix_length(data.train, model.config.image_token_id)
    pad = processor.tokenizer.pad_token_id
    model.train()
    curve: list[float] = []
    val = 0.0
    queue: list[tuple[int, list[int]]] = []
    bar = tqdm(total=cfg.steps, desc="stage 2: projector + decoder", unit="step")
    step = 0
    while step < cfg.steps and time.monotonic() - started < cfg.minutes * 60:
        if len(queue) < cfg.images_per_step:  # epochs over images, each in a fresh order
            queue += order.sample(images, len(images))
        groups, queue = queue[: cfg.images_per_step], queue[cfg.images_per_step :]
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr)
        loss, _ = grouped_loss(model, data, data.train, groups, prefix, pad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        curve.append(round(loss.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(curve[-20:]) / len(curve[-20:]):.4f}", val=f"{val:.3f}")
        if step % cfg.eval_every == 0:
            val = validation_accuracy(model, processor, data, cfg.val_rows)
    bar.close()
    seconds = time.monotonic() - started
    val = validation_accuracy(model, processor, data, cfg.final_val_rows or len(data.validation))
    model.eval()
    report = TrainReport(config=asdict(cfg), geometry=asdict(geometry), steps=step, seconds=round(seconds, 1),
                         parameters=sum(p.numel() for p in model.parameters()), val_accuracy=val,
                         loss_curve=curve[::10], vision_loss_curve=vision_curve[::10])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "TRAINING.json").write_text(json.dumps(asdict(report), indent=1))
    write_manifest(out)
    return report


def _check_single_token_answers(processor) -> None:
    import easy_vqa

    from eas_tools.demo.data import answer_ids

    long = [a for a in easy_vqa.get_answers() if len(answer_ids(processor, a)) != 2]
    if long:
        raise RuntimeError(f"tokenizer splits answers {long}: enlarge vocab_size or the answer corpus")
