"""Visual-token reduction (eas/model/token_reduction.py): exactness with reduction on, on the plain and the
EAS-converted tiny LLaVA, an independent reference (masking instead of dropping), refusals, persistence."""

from __future__ import annotations

import pytest
import torch

from eas.model.generation import generate
from eas.model.token_reduction import (
    TokenReduction,
    TokenReductionError,
    install_reduction,
    merge_into_kept,
    parse_token_keep,
    remove_reduction,
    select_tokens,
    token_reducer,
)
from eas.zoo.llava import build_llava
from tests.core.helpers import converted_llava, llava_batch, select

TOL = 1e-5


def _model(converted: bool):
    if converted:
        return converted_llava()
    model, processor = build_llava(seed=0)
    return model.eval(), processor


def _scores(out) -> torch.Tensor:
    return torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "eas"])
@pytest.mark.parametrize("criterion", ["cls", "merge"])
def test_batch_alone_cache_nocache_equal(converted: bool, criterion: str) -> None:
    model, processor = _model(converted)
    batch = llava_batch(processor)
    install_reduction(model, TokenReduction(keep_fraction=0.25, criterion=criterion))
    with torch.no_grad():
        cached = generate(model, batch, max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
        reducer = token_reducer(model)
        assert reducer.last_prompt_tokens == (41, 41 - 12)  # 16 image tokens per image, 4 kept
        uncached = generate(model, batch, max_new_tokens=4, use_cache=False, output_scores=True,
                            return_dict_in_generate=True)
        assert float((_scores(cached) - _scores(uncached)).abs().max()) <= TOL
        for i in range(2):
            alone = generate(model, select(batch, i), max_new_tokens=4, output_scores=True,
                             return_dict_in_generate=True)
            assert float((_scores(cached)[i] - _scores(alone)[0]).abs().max()) <= TOL
    # Negative control: the reduction changes what the model computes.
    with torch.no_grad():
        reduced = model(**batch, use_cache=False).logits[:, -1]
        remove_reduction(model)
        full = model(**batch, use_cache=False).logits[:, -1]
    assert float((reduced - full).abs().max()) > 1e-3


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "eas"])
def test_dropping_equals_masking_at_original_positions(converted: bool) -> None:
    """Independent reference: the unreduced model with the dropped image tokens masked out (attention mask 0,
    every position unchanged) computes the same last-token logits as the reduced model."""
    model, processor = _model(converted)
    batch = llava_batch(processor)
    install_reduction(model, TokenReduction(keep_count=5, criterion="cls"))
    reducer = token_reducer(model)
    with torch.no_grad():
        reduced = model(**batch, use_cache=False).logits[:, -1]
        dropped = reducer._session  # no cache: no session; read the kept rows from a cached pass instead
        assert dropped is None
        model(**batch, use_cache=True)
        dropped = reducer._session[1]
        remove_reduction(model)
        masked = dict(batch)
        masked["attention_mask"] = batch["attention_mask"] * (~dropped).long()
        length = batch["input_ids"].shape[1]
        masked["position_ids"] = torch.arange(length)[None].expand(2, -1)
        reference = model(**masked, use_cache=False).logits[:, -1]
        plain = model(**batch, use_cache=False).logits[:, -1]
    assert int(dropped.sum(dim=1)[0]) == 11
    assert float((reduced - reference).abs().max()) <= TOL
    assert float((plain - reference).abs().max()) > 1e-3  # the masking mattered


def test_kv_cache_and_keep_all_identity() -> None:
    model, processor = _model(False)
    batch = llava_batch(processor)
    with torch.no_grad():
        full = generate(model, batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
        install_reduction(model, TokenReduction(keep_fraction=1.0))
        same = generate(model, batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
        remove_reduction(model)
        install_reduction(model, TokenReduction(keep_fraction=0.25))
        small = generate(model, batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    assert float((_scores(full) - _scores(same)).abs().max()) <= TOL
    # The cache holds only the kept rows: 12 image rows fewer, plus the 2 decode steps written.
    assert full.past_key_values.get_seq_length() == 41 + 2
    assert small.past_key_values.get_seq_length() == 41 - 12 + 2


def test_selection_and_merge() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9], [0.4, 0.3, 0.2, 0.1]])
    keep = select_tokens(TokenReduction(keep_count=2), scores, 4, 2, torch.device("cpu"))
    assert keep.tolist() == [[False, True, False, True], [True, True, False, False]]  # tie -> earlier
    uniform = select_tokens(TokenReduction(keep_count=2, criterion="uniform"), None, 4, 1, torch.device("cpu"))
    assert uniform.tolist() == [[True, False, False, True]]
    features = torch.tensor([[[1.0], [2.0], [10.0], [20.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    merged = merge_into_kept(features, keys, torch.tensor([[True, False, True, False]]))
    assert merged.flatten().tolist() == [1.5, 2.0, 15.0, 20.0]


def test_budget_parsing() -> None:
    assert parse_token_keep("25%").keep_fraction == 0.25
    assert parse_token_keep("0.125").kept(64) == 8
    assert parse_token_keep("16", "merge").keep_count == 16
    assert TokenReduction(keep_count=100).kept(64) == 64
    with pytest.raises(TokenReductionError):
        parse_token_keep("a lot")
    with pytest.raises(ValueError):
        TokenReduction()


def test_refusals() -> None:
    from eas.zoo.qwen2vl import build_qwen2vl

    with pytest.raises(TokenReductionError, match="mrope"):
        install_reduction(build_qwen2vl(), TokenReduction(keep_fraction=0.5))
    model, _ = build_llava(seed=0)
    model.config.vision_feature_layer = 0  # the projector reads the embeddings: nothing to score
    with pytest.raises(TokenReductionError, match="uniform"):
        install_reduction(model, TokenReduction(keep_fraction=0.5))
    install_reduction(model, TokenReduction(keep_fraction=0.5, criterion="uniform"))
    with pytest.raises(TokenReductionError, match="already"):
        install_reduction(model, TokenReduction(keep_fraction=0.5, criterion="uniform"))
