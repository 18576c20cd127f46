"""In-process timings: phases add up, every call runs on the runner's own thread (as the service's batcher
does), and that thread uses the caller's torch thread count."""

from __future__ import annotations

import threading

import torch

from eas.model.loading import LoadedModel
from eas.zoo.llava import TINY
from eas_tools.bench.raw import RawRunner
from eas_tools.bench.variants import build_random
from tests.core.helpers import images


def test_phases_add_up_and_every_token_is_decoded() -> None:
    model, processor = build_random(TINY, seed=0)
    runner = RawRunner(LoadedModel(model=model, processor=processor))
    try:
        timing = runner.run(images(2), ["what colour is it?"] * 2, max_new_tokens=5)
    finally:
        runner.close()
    assert timing.new_tokens == 5  # the zeroed end-of-sequence row: random weights never stop early
    assert min(timing.vision_s, timing.prefill_s, timing.decode_s, timing.prepare_s) > 0
    assert timing.vision_s + timing.prefill_s + timing.decode_s + timing.prepare_s <= timing.e2e_s
    assert timing.decode_per_token_s == timing.decode_s / 4


def test_calls_run_on_one_worker_thread_with_the_callers_thread_count() -> None:
    model, processor = build_random(TINY, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = RawRunner(LoadedModel(model=model, processor=processor))
        first, second = runner.call(threading.get_ident), runner.call(threading.get_ident)
        assert first == second != threading.get_ident()
        assert runner.call(torch.get_num_threads) == 1
        runner.close()
    finally:
        torch.set_num_threads(before)
