"""The project's decode loop (eas/model/decoding.py) equals transformers' `generate`, bit for bit.

Both loops run on the same model and batch (left-padded, two images) with a recording logits processor:
the ids and every step's scores must be equal, on every supported family, converted (layer 0 skipped,
folded) and not. Each case first checks that the project's loop really applies to it, so no case passes by
falling back. Negative controls: the loop without the DummyLayer slots of a converted model's cache, or
without position ids taken from the mask, gives other scores on the same batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessor

from eas.model import decoding
from eas.model.fold import fold_model
from eas.model.generation import RowOptions, _own_loop, generate, generate_rows
from eas.zoo.families import FAMILIES, build_family
from tests.core.helpers import perturb
from tests.core.test_family_exactness import QUESTIONS, converted_family, family_batch, family_images

NEW = 6


class Recorder(LogitsProcessor):
    """Keeps each step's scores as the loop hands them over; changes nothing."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(scores.clone())
        return scores


def run(model, batch, loop: str, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    recorder = Recorder()
    ids = generate(model, batch, max_new_tokens=NEW, loop=loop, logits_processor=[recorder], **kwargs)
    return ids, recorder.steps


def assert_same(model, batch, **kwargs) -> None:
    assert decoding.applies(model, batch, {"do_sample": False, "logits_processor": []}), \
        decoding.decoder(model).reason
    stock_ids, stock_scores = run(model, batch, "transformers", **kwargs)
    own_ids, own_scores = run(model, batch, "eas", **kwargs)
    assert torch.equal(own_ids, stock_ids)
    assert len(own_scores) == len(stock_scores) >= 1
    for own, stock in zip(own_scores, stock_scores, strict=True):
        assert torch.equal(own, stock)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, converted and folded model, plain model, left-padded batch, processor)."""
    converted, processor = converted_family(request.param)
    fold_model(converted)
    plain, _ = build_family(request.param, seed=0)
    perturb(plain, seed=5, all_biases=True)
    batch = family_batch(processor)
    assert (batch["attention_mask"] == 0).any()  # left padding really present
    return request.param, converted, plain.eval(), batch, processor


def test_converted_model_decodes_exactly_as_generate(family) -> None:
    _, converted, _, batch, _ = family
    assert decoding.decoder(converted).skipped == (0, 2)
    assert_same(converted, batch)


def test_plain_model_decodes_exactly_as_generate(family) -> None:
    _, _, plain, batch, _ = family
    assert decoding.decoder(plain).skipped == ()
    assert_same(plain, batch)


def test_one_unpadded_row_decodes_exactly_as_generate(family) -> None:
    """No padding: both loops drop the all-ones mask."""
    _, converted, _, _, processor = family
    batch = family_batch(processor, questions=QUESTIONS[1:], images=family_images()[1:])
    assert (batch["attention_mask"] == 1).all()
    assert_same(converted, batch)


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_rows_with_sampling_stops_and_limits_match(name: str) -> None:
    """generate_rows (the service's sampled, stopped and streamed path) gives the same rows on both loops."""
    model, processor = converted_family(name)
    fold_model(model)
    batch = family_batch(processor)
    rows = [RowOptions(do_sample=True, temperature=0.8, top_p=0.9, seed=7, max_new_tokens=5),
            RowOptions(stop_token_ids=(17,), max_new_tokens=NEW)]
    steps = {}

    def results(loop: str):
        seen = steps.setdefault(loop, [])
        return generate_rows(model, batch, NEW, rows=rows, tokenizer=processor.tokenizer, loop=loop,
                             on_step=lambda event: seen.append(list(event.tokens)))

    assert results("eas") == results("transformers")
    assert steps["eas"] == steps["transformers"] and steps["eas"]


@pytest.mark.parametrize("control", ["no dummy slots", "no position ids"])
def test_negative_control_a_wrong_loop_is_caught(control: str, monkeypatch) -> None:
    model, processor = converted_family("llava")
    fold_model(model)
    batch = family_batch(processor)
    if control == "no dummy slots":
        monkeypatch.setattr(decoding, "dummy_skipped_slots", lambda cache, skipped: cache)
    else:
        monkeypatch.setattr(decoding.Decoder, "takes_position_ids", False, raising=False)
        monkeypatch.setattr(decoding.Decoder, "__init__", _init_without_positions(decoding.Decoder.__init__))
    with pytest.raises(AssertionError):
        assert_same(model, batch)


def _init_without_positions(init):
    def patched(self, model):
        init(self, model)
        self.takes_position_ids = False
    return patched


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"use_cache": False}, {"output_logits": True,
                                    "return_dict_in_generate": True}, {"min_new_tokens": 3}])
def test_other_options_go_to_transformers(kwargs, monkeypatch) -> None:
    model, processor = converted_family("llava")
    batch = family_batch(processor)
    assert not decoding.applies(model, batch, kwargs)
    assert not decoding.applies(model, batch, {"do_sample": True})  # sampling is a processor's (_RowSampler)
    monkeypatch.setattr(decoding.Decoder, "generate", lambda *a, **k: pytest.fail("the project's loop ran"))
    out = generate(model, batch, max_new_tokens=3, loop="eas", **kwargs)
    assert out is not None


def test_generation_config_changes_are_followed() -> None:
    """The loop's prepared config is rebuilt when the model's generation config changes."""
    model, processor = converted_family("llava")
    batch = family_batch(processor)
    before = generate(model, batch, max_new_tokens=NEW, loop="eas")
    first = decoding.decoder(model)
    assert decoding.decoder(model) is first  # prepared once
    model.generation_config.repetition_penalty = 3.0
    assert decoding.decoder(model) is not first
    assert_same(model, batch)
    original = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = [1]
    prepared = decoding.decoder(model)
    model.generation_config.suppress_tokens.append(2)  # changed in place: still a change
    assert decoding.decoder(model) is not prepared
    assert_same(model, batch)
    model.generation_config.suppress_tokens = original
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(before[0, batch["input_ids"].shape[1]])  # row 0's first token
    assert not torch.equal(generate(model, batch, max_new_tokens=NEW, loop="eas"), before)
    assert_same(model, batch)
    model.generation_config.eos_token_id = eos
    model.generation_config.num_beams = 2  # another generation mode: transformers' generate runs it
    assert decoding.decoder(model).reason == "generation mode beam_search"
    model.generation_config.num_beams = 1
    model.generation_config.repetition_penalty = 1.0
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, loop="eas"), before)


def test_loop_choice() -> None:
    gpu = SimpleNamespace(device=torch.device("cuda"))
    assert _own_loop(gpu, {}, {}, "auto") is None  # measured on the CPU only: a GPU keeps transformers' loop
    assert _own_loop(gpu, {}, {}, "transformers") is None
    with pytest.raises(ValueError, match="loop must be"):
        _own_loop(gpu, {}, {}, "fast")
