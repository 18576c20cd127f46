"""Stage 1 of the demo recipe: pretrain the CLIP-style vision tower before the LLaVA is trained.

Real LLaVAs start from a CLIP tower pretrained on hundreds of millions of images; only the projector
and the decoder learn the task. Trained end to end from scratch through the decoder, our tower learned
colour but never shape (shape questions stayed at chance, 34%, after 20 minutes): the only gradient it
gets comes through a randomly initialised decoder that first learns the question priors. Trained
directly, the same tower separates circle/rectangle/triangle to 99% in two minutes.

So stage 1 trains the tower to classify each training image's shape and colour, with a throw-away linear
head per attribute applied to **every patch token** (the features LLaVA's projector reads). A head on the
mean-pooled tokens was not enough: the tower then classified shape at 99%, but the decoder, attending to
individual tokens, still never read it (shape stayed at chance). Asked of every token, the whole image's
shape must be mixed into each one (98.6% per token on held-out images), so whichever image token the
decoder attends to carries it.
The labels are read from the train split's own questions (every image has one shape of one colour); the
held-out validation images and the test split are never seen. Flips and transposes of the image keep
both labels, so they are used as augmentation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from eas_tools.demo.optim import adamw, warmup_cosine

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")


@dataclass
class VisionPretrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0


def image_labels(questions: list[str], answers: list[str], image_ids: list[int]) -> dict[int, tuple[int, int]]:
    """image id -> (shape index, colour index), read from the questions asked about it.

    An attribute answer names one attribute and the question names the other ("what color is the
    triangle?" -> "blue"); a "yes" to a positive question ("is there a red shape?") or a "no" to a negated
    one ("is there not a red shape?") says that what it mentions is present. Images whose shape or colour
    no question reveals are left out (about 3%).
    """
    shape: dict[int, int] = {}
    color: dict[int, int] = {}
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        words = re.findall(r"[a-z]+", question.lower())
        negated = "not" in words or "no" in words
        present = [answer] if answer in SHAPES or answer in COLORS else []
        if present or (answer == "yes") != negated:  # the attributes the question mentions are present
            present += words
        for word in present:
            if word in SHAPES:
                shape[image] = SHAPES.index(word)
            elif word in COLORS:
                color[image] = COLORS.index(word)
    return {i: (shape[i], color[i]) for i in shape if i in color}


def _augment(pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
    if rng.random() < 0.5:
        pixels = pixels.flip(3)
    if rng.random() < 0.5:
        pixels = pixels.flip(2)
    if rng.random() < 0.5:
        pixels = pixels.transpose(2, 3)
    return pixels


def pretrain_vision_tower(vision_tower: nn.Module, pixels: torch.Tensor, shape: torch.Tensor, color: torch.Tensor,
                          cfg: VisionPretrainConfig | None = None) -> list[float]:
    """Train `vision_tower` (a CLIPVisionModel) in place to classify `shape` and `color` of `pixels`.

    Returns the loss curve. The heads are discarded: the LLaVA projector learns its own reading of the
    features in stage 2.
    """
    cfg = cfg or VisionPretrainConfig()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    hidden = vision_tower.config.hidden_size
    heads = nn.ModuleDict({"shape": nn.Linear(hidden, len(SHAPES)), "color": nn.Linear(hidden, len(COLORS))})
    params = [*vision_tower.parameters(), *heads.parameters()]
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    vision_tower.train()
    curve: list[float] = []
    bar = tqdm(range(cfg.steps), desc="stage 1: vision tower", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr)
        rows = torch.tensor([rng.randrange(len(pixels)) for _ in range(cfg.batch_size)])
        tokens = vision_tower(pixel_values=_augment(pixels[rows], rng)).last_hidden_state[:, 1:]  # no CLS
        per_token, n = tokens.flatten(0, 1), tokens.shape[1]
        loss = (nn.functional.cross_entropy(heads["shape"](per_token), shape[rows].repeat_interleave(n))
                + nn.functional.cross_entropy(heads["color"](per_token), color[rows].repeat_interleave(n)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{sum(curve[-20:]) / len(curve[-20:]):.4f}")
    return curve
