"""Load a model directory (plain HF or EAS-converted) into a ready-to-answer `LoadedModel`.

This is the one entry point the service, the evaluation harness and the benchmarks use, so that
all of them build prompts, batch, pad and generate the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    BatchFeature,
    PreTrainedModel,
    ProcessorMixin,
)

from eas.manifest import verify_manifest
from eas.model.plan import SkipPlan
from eas.model.prompting import build_prompt


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: ProcessorMixin
    name: str = "model"
    path: Path | None = None
    plan: SkipPlan | None = None  # set for EAS-converted models
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # Which decode loop generation runs (eas.model.generation, `loop`): "auto" is the project's own
    # (eas.model.decoding) on the CPU wherever it is exact, transformers' `generate` elsewhere.
    decode_loop: str = "auto"

    def prepare_one(self, image: Image.Image, question: str) -> BatchFeature:
        """Processor inputs of one request, unpadded, on the CPU: the part of `prepare` that depends on
        the request alone, so a server can run it per request (off its batch worker) and `collate` later."""
        prompt = build_prompt(self.processor, question)
        return self.processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")

    def collate(self, rows: list[BatchFeature]) -> BatchFeature:
        """`prepare_one` results as one batch: the same tensors `prepare` builds for those requests.

        Sequence tensors ([1, length] like `input_ids`) are padded on the tokenizer's padding side (pad id
        for `input_ids`, 0 otherwise); every other tensor (pixel values, image sizes or grids) is
        concatenated along its first dimension, as the processor itself does for a batch."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        left = getattr(tokenizer, "padding_side", "left") == "left"
        width = max(int(r["input_ids"].shape[1]) for r in rows)
        data: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == 1
                   and v.shape[1] == r["input_ids"].shape[1] for v, r in zip(values, rows, strict=True)):
                fill = pad_id if key == "input_ids" else 0
                padded = []
                for v in values:
                    pad = v.new_full((1, width - v.shape[1]), fill)
                    padded.append(torch.cat([pad, v] if left else [v, pad], dim=1))
                data[key] = torch.cat(padded, dim=0)
            else:
                data[key] = _cat_padding_images(values)
        batch = BatchFeature(data).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    @functools.cached_property
    def max_positions(self) -> int | None:
        """How many positions the language model has (prompt and answer together), when its config says.
        Read once: the server checks it for every request, and a config attribute read costs microseconds."""
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        value = getattr(text, "max_position_embeddings", None)
        return int(value) if value else None

    def prepare(self, images: list[Image.Image], questions: list[str]) -> BatchFeature:
        """Processor inputs for a batch, left-padded, on the model's device."""
        prompts = [build_prompt(self.processor, q) for q in questions]
        # One image per sample, nested: Gemma3's processor reads a flat list as all images of one prompt.
        images = [[im.convert("RGB")] for im in images]
        batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        batch = batch.to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    @torch.inference_mode()
    def generate_ids(self, batch: BatchFeature, max_new_tokens: int = 8, **options: Any) -> torch.Tensor:
        """Greedy continuation ids (prompt removed), shape [B, <= max_new_tokens]. `options` go to
        `eas.model.generation.generate` (e.g. `stopping_criteria`)."""
        from eas.model.generation import generate  # EAS-aware: pooling state and KV-cache layout

        out = generate(self.model, batch, max_new_tokens=max_new_tokens, plan=self.plan, loop=self.decode_loop,
                       **options)
        return out[:, batch["input_ids"].shape[1] :]

    def decode(self, ids: torch.Tensor) -> list[str]:
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8) -> list[str]:
        """Answers for a batch of (image, question) pairs, in order."""
        return self.decode(self.generate_ids(self.prepare(images, questions), max_new_tokens))


def _cat_padding_images(values: list) -> torch.Tensor:
    """Concatenate along dim 0; per-image tensors with a different number of tiles/patches in dim 1
    ([1, patches, C, H, W]: LLaVA-NeXT and LLaVA-OneVision "anyres", Idefics3 splits) are first zero-padded
    to the largest, as their processors pad a batch (the models drop the padding by image size or by
    all-zero tiles)."""
    if all(isinstance(v, torch.Tensor) and v.dim() >= 3 for v in values) and len({v.shape[1] for v in values}) > 1:
        most = max(v.shape[1] for v in values)
        values = [torch.cat([v, v.new_zeros((v.shape[0], most - v.shape[1], *v.shape[2:]))], dim=1) for v in values]
    return torch.cat(values, dim=0)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    name: str | None = None,
    *,
    verify: bool = True,
) -> LoadedModel:
    """Verify the directory's checksums (when it has a manifest), then load it; EAS-converted directories
    re-apply their plan. `verify=False` only where the caller has just verified them itself (a model-store
    version: `ModelStore.path_for_loading`), so no file is hashed twice per load."""
    path = Path(path)
    if verify:
        verify_manifest(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from eas.model.persistence import is_converted, load_converted

    if is_converted(path):
        model, plan = load_converted(path)
        from eas.model.token_reduction import apply_stored_reduction  # issue 19: plan + token budget

        apply_stored_reduction(model, path)
    else:
        # trust_remote_code=False: the service never runs code shipped in a model directory.
        model, plan = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                                  trust_remote_code=False), None
    model = model.to(device=dev, dtype=dt).eval()
    from eas.model.processors import load_processor  # AutoProcessor, or without torchvision's video processors

    processor = load_processor(path)
    return LoadedModel(model=model, processor=processor, name=name or path.name, path=path,
                       plan=plan, device=dev, dtype=dt)
