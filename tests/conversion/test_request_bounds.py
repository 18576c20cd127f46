"""A conversion request's sizes and device are checked when it is made (the admin API: at submission),
not discovered by a job that fails, or runs for hours, later."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from eas.conversion.pipeline import MAX_BATCH_SIZE, MAX_ROWS, MAX_THREADS, ConversionRequest


def _request(**fields) -> ConversionRequest:
    return ConversionRequest(store="/tmp/never-opened", model="m", skip_count=1, **fields)


@pytest.mark.parametrize(("field", "limit"), [("batch_size", MAX_BATCH_SIZE), ("threads", MAX_THREADS),
                                              ("val_size", MAX_ROWS), ("calibration_samples", MAX_ROWS)])
def test_sizes_have_an_upper_bound(field: str, limit: int) -> None:
    assert getattr(_request(**{field: limit}), field) == limit  # the bound itself is allowed
    with pytest.raises(ValidationError, match=field):
        _request(**{field: 10**9})


@pytest.mark.parametrize("device", ["tpu:9", "cuda:x", "CPU ", "gpu"])
def test_an_unknown_device_is_refused(device: str) -> None:
    with pytest.raises(ValidationError, match="is not one of auto, cpu, mps, cuda"):
        _request(device=device)


def test_a_device_this_machine_lacks_is_refused() -> None:
    assert _request(device="cpu").device == "cpu" and _request(device="auto").device == "auto"
    if torch.cuda.is_available():
        with pytest.raises(ValidationError, match="CUDA devices"):
            _request(device=f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValidationError, match="no CUDA device"):
            _request(device="cuda")
