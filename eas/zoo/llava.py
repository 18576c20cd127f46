"""LLaVA models (CLIP vision tower + projector + Llama decoder) built from sizes, with their processor.

Four geometries share this recipe: the unit-test `tiny`, the trained demo model, and the latency
geometries `bench` (CPU-sized) and `llava-1.5-7b` (GPU only). Weights are random (seeded); training
happens elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from eas.zoo.tokenizer import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, train_tokenizer

# Prompt format of every model built here; saved with the processor as its chat template so that
# serving and evaluation build prompts the same way for any model (see eas.model.prompting).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}question: {{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}"
)


@dataclass(frozen=True)
class LlavaGeometry:
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_intermediate: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    # Which vision layer feeds the projector: -2 (LLaVA's default) leaves the last vision layer unused,
    # which a model trained from scratch would pay for in compute for nothing.
    vision_feature_layer: int = -2


TINY = LlavaGeometry()
# The embedded easy-vqa model (eas/demo): 64-px images in 8-px patches (64 image tokens). A 16-px variant
# (16 tokens, 192-wide 3-layer tower) trained twice as fast per step but did not ground better in 5 minutes.
DEMO = LlavaGeometry(image_size=64, patch_size=8, vision_hidden=96, vision_intermediate=384, vision_layers=2,
                     vision_heads=4, text_hidden=128, text_intermediate=512, text_layers=4, text_heads=4,
                     text_kv_heads=2, vocab_size=512, vision_feature_layer=-1)

# Latency work only (random weights, never trained): LLaVA-like shape at small scale, 336-px images in
# 14-px patches = 576 image tokens, a 12-layer 1024-wide decoder.
BENCH = LlavaGeometry(image_size=336, patch_size=14, vision_hidden=256, vision_intermediate=1024, vision_layers=2,
                      vision_heads=4, text_hidden=1024, text_intermediate=2816, text_layers=12, text_heads=16,
                      text_kv_heads=16, vocab_size=512, vision_feature_layer=-1)

# LLaVA-1.5-7B's shape (CLIP ViT-L/14 at 336 px: 576 image tokens, 24 layers 1024 wide; a 32-layer 4096-wide
# Vicuna-7B decoder, vocabulary 32000), random weights, for GPU latency work only: 7 B parameters are 28 GB in
# fp32, so `eas bench` refuses to build it on a CPU and builds it in bf16 directly on the GPU.
LLAVA_15_7B = LlavaGeometry(image_size=336, patch_size=14, vision_hidden=1024, vision_intermediate=4096,
                            vision_layers=24, vision_heads=16, text_hidden=4096, text_intermediate=11008,
                            text_layers=32, text_heads=32, text_kv_heads=32, vocab_size=32000,
                            max_position_embeddings=4096, vision_feature_layer=-2)

GEOMETRIES: dict[str, LlavaGeometry] = {"tiny": TINY, "demo": DEMO, "bench": BENCH, "llava-1.5-7b": LLAVA_15_7B}


def default_corpus() -> list[str]:
    """Words a tiny test tokenizer should know: shapes, colours, question templates."""
    colours = ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black", "white"]
    shapes = ["circle", "rectangle", "triangle", "square", "shape"]
    lines = []
    for c in colours:
        for s in shapes:
            lines += [f"question: what colour is the {s}? answer: {c}", f"is there a {c} {s}? yes no"]
    lines += ["question: what is in the image? answer: a picture of a cat", "hello world, how are you"]
    return lines * 3


def build_llava_config(geometry: LlavaGeometry) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
    )
    text = LlamaConfig(
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_kv_heads,
        vocab_size=geometry.vocab_size,
        max_position_embeddings=geometry.max_position_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=geometry.vision_feature_layer,
        pad_token_id=PAD_ID,
    )


def build_llava_processor(geometry: LlavaGeometry, corpus: list[str] | None = None) -> LlavaProcessor:
    tokenizer = train_tokenizer(corpus or default_corpus(), vocab_size=geometry.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_llava(
    geometry: LlavaGeometry = TINY, seed: int = 0, corpus: list[str] | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA (bit-identical for a given seed) and its processor."""
    config = build_llava_config(geometry)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model, build_llava_processor(geometry, corpus)
