"""Shared builders for the EAS core tests: tiny models with non-trivial adapters and gains.

Every equivalence test uses non-zero up-projections, non-zero biases and non-unit norm gains,
because with B = D = 0 and unit gains a wrong fold formula can still look right (eas-method.md §9).
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from eas.model.adapters import AdapterConfig
from eas.model.convert import apply_plan
from eas.model.plan import SkipPlan
from eas.model.prompting import build_prompt
from eas.zoo.llava import build_llava

NONTRIVIAL = AdapterConfig(pia_rank=16, kept_rank=8, up_init="xavier", dropout=0.0, scale=1.0)
QUESTIONS = ["what colour is the circle?", "is there a big red square in the picture, and is it blue?"]


def perturb(module: nn.Module, seed: int = 1, scale: float = 0.3, all_biases: bool = False) -> None:
    """Make norm gains non-unit and every adapter bias (every bias with all_biases) non-zero, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            is_gain = name.endswith("norm.weight") or "layernorm" in name
            is_adapter_bias = name.endswith("bias") and (all_biases or "pia" in name or "adapter" in name)
            if is_gain or is_adapter_bias:
                param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def images(n: int = 2) -> list[Image.Image]:
    colours = ["red", "blue", "green", "yellow"]
    return [Image.new("RGB", (40 + 7 * i, 36), colours[i % 4]) for i in range(n)]


def llava_batch(processor, questions=QUESTIONS, padding_side: str = "left"):
    processor.tokenizer.padding_side = padding_side
    prompts = [build_prompt(processor, q) for q in questions]
    batch = processor(images=images(len(questions)), text=prompts, return_tensors="pt", padding=True)
    processor.tokenizer.padding_side = "left"
    return batch


def converted_llava(skipped=(1, 3), cfg: AdapterConfig = NONTRIVIAL, seed: int = 0):
    """A tiny LLaVA (perturbed gains) in adapter form, eval mode, plus its processor."""
    model, processor = build_llava(seed=seed)
    perturb(model, seed=seed + 11)
    apply_plan(model, SkipPlan(skipped=tuple(skipped), num_layers=4), cfg)
    perturb(model, seed=seed + 12)
    return model.eval(), processor


def select(batch, index: int):
    """Sample `index` of a left-padded batch on its own, padding removed."""
    keep = batch["attention_mask"][index].bool()
    return {
        "input_ids": batch["input_ids"][index][keep][None],
        "attention_mask": batch["attention_mask"][index][keep][None],
        "pixel_values": batch["pixel_values"][index : index + 1],
    }
