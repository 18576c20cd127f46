"""One copy of the weights for the HTTP process and the model process (service/runner/shared_weights.py): the
parent's parameters move into an anonymous memory file, and a second load adopts them after checking names,
shapes and dtypes, reporting any value that differed. Answers are unchanged, with a negative control."""

from __future__ import annotations

import ctypes
import io
import os

import pytest
import torch
from PIL import Image

from eas.model.loading import LoadedModel, load_model
from service.runner.shared_weights import WeightsDiffer, adopt, share
from tests.service.conftest import ModelDirs, image_bytes

QUESTION = "what colour is the circle?"


def _load(model_dirs: ModelDirs) -> LoadedModel:
    return load_model(model_dirs.eas, device="cpu", dtype="fp32")


def _answers(model: LoadedModel) -> list[str]:
    images = [Image.open(io.BytesIO(image_bytes(colour))) for colour in ((200, 30, 30), (30, 30, 200))]
    return model.answer(images, [QUESTION, "what shape is it?"], 6)


def _inside(tensor: torch.Tensor, mapping: object) -> bool:
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))  # type: ignore[arg-type]
    return start <= tensor.data_ptr() < start + len(mapping)  # type: ignore[arg-type]


def test_both_models_compute_on_the_one_shared_copy_and_answer_as_before(model_dirs: ModelDirs) -> None:
    expected = _answers(_load(model_dirs))
    parent, child = _load(model_dirs), _load(model_dirs)
    shared = share(parent.model)
    assert shared is not None
    fd, layout = shared
    try:
        assert adopt(child.model, fd, layout) == []  # the same files: every value agreed
    finally:
        os.close(fd)
    for model in (parent, child):
        mapping = model.model._eas_shared_weights
        assert all(_inside(p, mapping) for p in model.model.parameters())
    assert layout.size >= sum(p.numel() * p.element_size() for p in parent.model.parameters())
    assert _answers(parent) == expected and _answers(child) == expected


def test_a_value_that_differs_is_reported_and_the_shared_one_wins(model_dirs: ModelDirs) -> None:
    """The negative control: a child whose own load differs in one parameter is caught, and then computes
    with the parent's numbers, so both processes still answer alike."""
    parent, child = _load(model_dirs), _load(model_dirs)
    name, param = next(iter(child.model.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)
    fd, layout = share(parent.model)  # type: ignore[misc]
    try:
        assert adopt(child.model, fd, layout) == [name]
    finally:
        os.close(fd)
    assert torch.equal(dict(child.model.named_parameters())[name], dict(parent.model.named_parameters())[name])
    assert _answers(child) == _answers(parent)


def test_other_shapes_are_refused_before_anything_is_replaced(model_dirs: ModelDirs) -> None:
    parent, child = _load(model_dirs), _load(model_dirs)
    name, param = list(child.model.named_parameters())[-1]
    param.data = torch.zeros(param.numel() + 1)
    before = {n: p.data_ptr() for n, p in child.model.named_parameters()}
    fd, layout = share(parent.model)  # type: ignore[misc]
    try:
        with pytest.raises(WeightsDiffer, match=name):
            adopt(child.model, fd, layout)
    finally:
        os.close(fd)
    assert {n: p.data_ptr() for n, p in child.model.named_parameters()} == before
