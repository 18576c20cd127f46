"""The supernet runs either form of each candidate layer and leaves the source model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from eas.conversion.supernet import Supernet, SwitchableLayer
from eas.model.adapters import AdapterConfig
from eas.model.convert import apply_plan
from eas.model.plan import SkipPlan
from eas.zoo.llava import build_llava
from tests.core.helpers import llava_batch

CFG = AdapterConfig(dropout=0.0)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def test_switches_reproduce_the_plain_and_the_converted_model() -> None:
    model, processor = build_llava(seed=0)
    batch = llava_batch(processor)
    source = _logits(model, batch)
    reference = copy.deepcopy(model)
    apply_plan(reference, SkipPlan(skipped=(1, 3), num_layers=4), CFG)  # identity-initialised adapters
    converted = _logits(reference.eval(), batch)
    assert not torch.allclose(converted, source, atol=1e-3)  # skipping attention changes the model

    with Supernet(model, candidates=(1, 2, 3), adapters=CFG) as net:
        layers = model.model.language_model.layers
        assert [isinstance(layer, SwitchableLayer) for layer in layers] == [False, True, True, True]
        net.set_skipped(())
        assert torch.allclose(_logits(model, batch), source, atol=1e-6)  # identity adapters, nothing skipped
        net.set_skipped((1, 3))
        assert torch.allclose(_logits(model, batch), converted, atol=1e-6)  # the core's SkippedLayer form
        with pytest.raises(ValueError, match="not search candidates"):
            net.set_skipped((0,))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".pia." in n or ".adapter." in n for n in trainable)
    assert torch.equal(_logits(model, batch), source)  # removed: the source model is back, bit for bit
    assert [type(layer).__name__ for layer in model.model.language_model.layers] == ["LlamaDecoderLayer"] * 4
    assert all(p.requires_grad for p in model.parameters())  # flags restored (a fresh model trains everything)
