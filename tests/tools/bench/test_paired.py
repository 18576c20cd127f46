"""`eas bench` bases its acceptance on paired per-repetition ratios (issue 18)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eas_tools.bench.report import FlopRatios, Flops, FlopsUnavailable, RawStats
from eas_tools.bench.run import acceptance, paired_speedup


def _raw(e2e: list[float]) -> RawStats:
    return RawStats(median_s={}, samples_s={"e2e_s": e2e}, new_tokens=[4], prompt_tokens=[20])


# Repetition 2's neighbour slowed only EAS's HTTP run, repetition 3's only the baseline's: the unpaired
# medians mix repetitions (10 / 8.5 = 1.18x) while each repetition's own ratio says 1.25x twice out of three.
BASE_HTTP, EAS_HTTP = [10.0, 10.0, 30.0], [8.0, 29.0, 8.5]
BASE_RAW, EAS_RAW = [9.0, 9.0, 9.0], [7.2, 7.2, 7.2]  # 1.25x every repetition


def test_paired_ratios_are_per_repetition() -> None:
    paired = paired_speedup({"baseline": _raw(BASE_RAW), "eas": _raw(EAS_RAW)},
                            {"baseline": BASE_HTTP, "eas": EAS_HTTP})
    assert paired.http_e2e_ratios == pytest.approx([1.25, 10 / 29, 30 / 8.5])
    assert paired.http["e2e_s"] == pytest.approx(1.25) and paired.raw["e2e_s"] == pytest.approx(1.25)
    assert paired.http_over_raw == pytest.approx(1.0)


def test_acceptance_uses_the_paired_ratios() -> None:
    paired = paired_speedup({"baseline": _raw(BASE_RAW), "eas": _raw(EAS_RAW)},
                            {"baseline": BASE_HTTP, "eas": EAS_HTTP})
    batch = SimpleNamespace(http_speedup={"e2e_s": 10 / 8.5}, raw_speedup={"e2e_s": 1.25}, paired=paired)
    flops = Flops.__new__(Flops)
    object.__setattr__(flops, "ratio", FlopRatios.__new__(FlopRatios))
    object.__setattr__(flops.ratio, "total", 1.2)
    checked = acceptance(flops, {"1": batch}).of("1")  # type: ignore[dict-item]
    assert checked.basis == "paired" and checked.http_speedup == pytest.approx(1.25)
    assert checked.http_speedup_ge_flop_ratio and checked.http_speedup_ge_95pct_raw
    # negative control: the same samples judged by unpaired medians fail both checks
    unpaired = acceptance(flops, {"1": SimpleNamespace(**{**vars(batch), "paired": None})}).of("1")  # type: ignore
    assert unpaired.basis == "median"
    assert not unpaired.http_speedup_ge_flop_ratio and not unpaired.http_speedup_ge_95pct_raw
    assert acceptance(FlopsUnavailable("n/a"), {"1": batch}).of("1").http_speedup_ge_flop_ratio is None  # type: ignore
