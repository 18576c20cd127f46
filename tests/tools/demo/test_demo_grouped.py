"""Grouped stage-2 batches (one prefix pass per image) give exactly the loss and gradients of full
sequences, on a tiny LLaVA with hand-made data."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from eas.model.prompting import build_prompt
from eas.zoo.llava import TINY, build_llava
from eas_tools.demo.data import EasyVQATensors, Split, answer_ids, collate
from eas_tools.demo.grouped import grouped_loss, questions_by_image, shared_prefix_length

QUESTIONS = ["what color is the shape?", "is there a red circle?", "what shape is this?",
             "is there not a blue shape?", "what is the color of the triangle?"]
ANSWERS = ["red", "yes", "circle", "no", "blue"]


def _data(processor, images: int = 3) -> EasyVQATensors:
    blank = Image.new("RGB", (TINY.image_size, TINY.image_size))
    prompts = [list(processor(text=[build_prompt(processor, q)], images=[blank])["input_ids"][0]) for q in QUESTIONS]
    rows = [(k % len(QUESTIONS), k % images) for k in range(3 * images + 1)]  # uneven questions per image
    split = Split(question_ids=[prompts[q] for q, _ in rows],
                  answer_ids=[answer_ids(processor, ANSWERS[q]) for q, _ in rows],
                  image_index=torch.tensor([i for _, i in rows]),
                  questions=[QUESTIONS[q] for q, _ in rows], answers=[ANSWERS[q] for q, _ in rows])
    torch.manual_seed(1)
    pixels = torch.randn(images, 3, TINY.image_size, TINY.image_size)
    return EasyVQATensors(pixels=pixels, image_ids=list(range(images)), train=split, validation=split)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grouped_loss_and_gradients_equal_full_sequences() -> None:
    model, processor = build_llava(TINY, seed=0)
    data = _data(processor)
    pad = processor.tokenizer.pad_token_id
    prefix = shared_prefix_length(data.train, model.config.image_token_id)
    groups = sorted(questions_by_image(data.train).items())

    loss, rows = grouped_loss(model, data, data.train, groups, prefix, pad)
    loss.backward()
    grouped = _grads(model)
    model.zero_grad(set_to_none=True)
    reference = model(**collate(data, data.train, rows, pad))
    reference.loss.backward()
    full = _grads(model)

    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)
    assert grouped.keys() == full.keys() and len(full) > 10
    for name, grad in full.items():
        torch.testing.assert_close(grouped[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sorted(rows) == list(range(len(data.train)))

    # negative control: the same rows answered about the wrong images give a different loss
    model.zero_grad(set_to_none=True)
    swapped = [(groups[(k + 1) % len(groups)][0], members) for k, (_, members) in enumerate(groups)]
    wrong, _ = grouped_loss(model, data, data.train, swapped, prefix, pad)
    assert not torch.allclose(wrong, reference.loss, rtol=1e-4)


def test_shared_prefix_covers_the_image_and_stops_at_the_question() -> None:
    model, processor = build_llava(TINY, seed=0)
    data = _data(processor)
    prefix = shared_prefix_length(data.train, model.config.image_token_id)
    ids = data.train.question_ids[0]
    assert model.config.image_token_id in ids[:prefix] and model.config.image_token_id not in ids[prefix:]
    assert prefix < min(len(q) for q in data.train.question_ids)  # the questions themselves differ

    moved = Split(question_ids=[[*data.train.question_ids[0][1:], 0], *data.train.question_ids[1:]],
                  answer_ids=data.train.answer_ids, image_index=data.train.image_index,
                  questions=data.train.questions, answers=data.train.answers)
    with pytest.raises(ValueError, match="image prefix"):
        shared_prefix_length(moved, model.config.image_token_id)
