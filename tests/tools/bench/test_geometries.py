"""The latency geometries have the shapes they are named after (counted on the meta device: no memory)."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from eas.zoo.llava import BENCH, GEOMETRIES, LLAVA_15_7B, build_llava_config
from eas_tools.bench.flops import Shape


def _parameters(geometry) -> int:
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(build_llava_config(geometry))
    return sum(p.numel() for p in model.parameters())


def test_llava_15_7b_geometry_has_7b_parameters_and_576_image_tokens() -> None:
    assert 7.0e9 < _parameters(LLAVA_15_7B) < 7.1e9  # LLaVA-1.5-7B: 7.06 B
    shape = Shape.from_config(build_llava_config(LLAVA_15_7B))
    assert (shape.image_tokens, shape.layers, shape.hidden, shape.vocab) == (576, 32, 4096, 32000)
    assert (shape.vision_hidden, shape.vision_layers) == (1024, 24)


def test_bench_geometry_and_names() -> None:
    assert 150e6 < _parameters(BENCH) < 170e6
    assert Shape.from_config(build_llava_config(BENCH)).image_tokens == 576
    assert GEOMETRIES["llava-1.5-7b"] is LLAVA_15_7B and GEOMETRIES["bench"] is BENCH
