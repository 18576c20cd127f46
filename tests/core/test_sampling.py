"""The library generation API's sampling, stopping and streaming (eas/model/generation.py; issue 18)."""

from __future__ import annotations

import itertools

import pytest
import torch

from eas.model.generation import RowOptions, _Row, _RowSampler, generate, generate_rows, stream_safe
from tests.core.helpers import converted_llava, llava_batch, select

NEW = 8


@pytest.fixture(scope="module")
def llava():
    model, processor = converted_llava((0, 2))
    return model, processor, llava_batch(processor)


def _new(ids: torch.Tensor, batch) -> torch.Tensor:
    return ids[:, batch["input_ids"].shape[1]:]


def test_temperature_zero_and_tiny_top_p_are_greedy(llava) -> None:
    model, _, batch = llava
    greedy = generate(model, batch, max_new_tokens=NEW)
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, temperature=0.0, seed=1), greedy)
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, top_p=1e-6, seed=1), greedy)
    # Below float32's range (0 there): once a division by zero into NaNs, and a top token filtered out.
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, top_p=1e-300, seed=1), greedy)
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, temperature=1e-300, seed=1),
                       greedy)
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, temperature=5e-324, seed=1),
                       greedy)
    sampled = generate(model, batch, max_new_tokens=NEW, do_sample=True, temperature=1.0, seed=1)
    assert not torch.equal(sampled, greedy)  # negative control: sampling does change the answer


def test_seeded_sampling_is_reproducible_and_the_seed_matters(llava) -> None:
    model, _, batch = llava
    a = generate(model, batch, max_new_tokens=NEW, do_sample=True, seed=7)
    assert torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, seed=7), a)
    assert not torch.equal(generate(model, batch, max_new_tokens=NEW, do_sample=True, seed=8), a)


def test_a_seeded_row_is_independent_of_its_batch_mates(llava) -> None:
    model, _, batch = llava
    row = RowOptions(do_sample=True, temperature=0.9, seed=21)
    together = _new(generate(model, batch, max_new_tokens=NEW,
                             rows=[row, RowOptions(do_sample=True, seed=99)]), batch)
    other_mate = _new(generate(model, batch, max_new_tokens=NEW, rows=[row, RowOptions()]), batch)
    alone_batch = select(batch, 0)
    alone = _new(generate(model, alone_batch, max_new_tokens=NEW, rows=[row]), alone_batch)
    assert torch.equal(together[0], alone[0])
    assert torch.equal(other_mate[0], alone[0])


def test_sampler_follows_the_nucleus_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log()[None].repeat(2, 1)
    rows = [_Row(RowOptions(do_sample=True, top_p=0.8, seed=1), 1), _Row(RowOptions(), 1)]
    sampler = _RowSampler(rows)
    counts = torch.zeros(4)
    for _ in range(2000):
        out = sampler(torch.zeros(2, 1, dtype=torch.long), scores)
        counts[out[0].argmax()] += 1
        assert torch.equal(out[1], scores[1])  # a greedy row's scores are left alone
    assert counts[2] == counts[3] == 0  # outside the nucleus (0.5 + 0.3 reaches 0.8)
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.04


def test_per_row_limits_and_stop_token(llava) -> None:
    model, _, batch = llava
    greedy = _new(generate(model, batch, max_new_tokens=NEW), batch).tolist()
    stop_id = greedy[1][3]
    first = greedy[1].index(stop_id)
    results = generate_rows(model, batch, max_new_tokens=NEW,
                            rows=[RowOptions(max_new_tokens=2), RowOptions(stop_token_ids=(stop_id,))])
    assert results[0].token_ids == greedy[0][:2] and results[0].finish_reason == "length"
    assert results[1].token_ids == greedy[1][:first + 1]
    assert results[1].finish_reason == "stop" and results[1].stop == stop_id


def test_stop_string_cuts_the_text(llava) -> None:
    model, processor, batch = llava
    tok = processor.tokenizer
    full = generate_rows(model, batch, max_new_tokens=NEW, tokenizer=tok)
    text = full[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = generate_rows(model, batch, max_new_tokens=NEW, tokenizer=tok, rows=[RowOptions(stop=(stop,)), RowOptions()])
    assert cut[0].finish_reason == "stop" and cut[0].stop == stop
    assert cut[0].text == text[: text.find(stop)] and stop not in cut[0].text
    assert len(cut[0].token_ids) < len(full[0].token_ids)
    assert cut[1].text == full[1].text  # the batch-mate is untouched
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, batch, stop=("x",))


def test_on_step_streams_every_row_and_cancels_one(llava) -> None:
    model, processor, batch = llava
    greedy = _new(generate(model, batch, max_new_tokens=NEW), batch).tolist()
    events = []

    def on_step(event):
        events.append(event)
        return [1] if event.step == 2 else None

    results = generate_rows(model, batch, max_new_tokens=NEW, tokenizer=processor.tokenizer, on_step=on_step)
    assert [e.step for e in events] == list(range(len(events)))
    assert [e.tokens[0] for e in events] == greedy[0][: len(events)]
    assert [e.tokens[1] for e in events[:3]] == greedy[1][:3]
    assert all(e.tokens[1] is None for e in events[3:])
    assert results[1].finish_reason == "cancelled" and results[1].token_ids == greedy[1][:3]
    assert results[0].token_ids == greedy[0][: len(results[0].token_ids)]
    texts = [e.texts[0] for e in events]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert texts[-1] == results[0].text


def test_cancelling_every_row_ends_the_call(llava) -> None:
    model, _, batch = llava
    steps = []
    results = generate_rows(model, batch, max_new_tokens=NEW, on_step=lambda e: steps.append(e.step) or [0, 1])
    assert steps == [0] and all(r.finish_reason == "cancelled" and len(r.token_ids) == 1 for r in results)


def test_stream_safe_holds_back_possible_stop_prefixes() -> None:
    assert stream_safe("the red", ("e",)) == ("th", "e")
    assert stream_safe("colour: bl", ("blue",)) == ("colour: ", None)
    assert stream_safe("abc\ufffd", ()) == ("abc", None)
    assert stream_safe("abc", ("xyz",)) == ("abc", None)


@pytest.mark.parametrize("options,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(do_sample=True, num_beams=2), "beam"), (dict(do_sample=True, seed=2**64), "seed"),
])
def test_bad_options_are_refused(llava, options, match) -> None:
    model, _, batch = llava
    with pytest.raises(ValueError, match=match):
        generate(model, batch, max_new_tokens=2, **options)


def test_generate_pads_a_row_after_its_end_even_without_an_eos_id(llava) -> None:
    model, _, batch = llava
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # transformers then never pads finished rows itself
    try:
        ids = _new(generate(model, batch, max_new_tokens=NEW, rows=[RowOptions(max_new_tokens=2), RowOptions()]),
                   batch)
    finally:
        model.generation_config.eos_token_id = eos
    pad = model.generation_config.pad_token_id
    assert ids.shape[1] == NEW and (ids[0, 2:] == pad).all() and not (ids[1] == pad).all()
