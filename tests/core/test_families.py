"""The locator and the fold on the other supported families (text path; images are LLaVA/Qwen2-VL's tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from eas.model.arch import locate_decoder
from eas.model.convert import apply_plan
from eas.model.fold import fold_model
from eas.model.plan import SkipPlan
from tests.core.helpers import NONTRIVIAL, perturb


@pytest.mark.parametrize(
    "config_cls,model_cls",
    [(Idefics3Config, Idefics3ForConditionalGeneration), (SmolVLMConfig, SmolVLMForConditionalGeneration)],
)
def test_idefics3_family_converts_and_folds_exactly(config_cls, model_cls) -> None:
    config = config_cls(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=3,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    decoder = locate_decoder(model)
    assert decoder.layers is model.model.text_model.layers
    perturb(model, seed=2)
    apply_plan(model, SkipPlan(skipped=(0, 2), num_layers=4), NONTRIVIAL)
    perturb(model, seed=3)
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        fold_model(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert (after - before)[mask.bool()].abs().max() < 1e-4
