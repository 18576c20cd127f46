"""Freed memory kept for reuse (service/allocator.py): a batch-shaped allocation pattern stops faulting its
pages in afresh each time, and the service applies it at start-up only when the setting is on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service import allocator
from tests.service.conftest import ModelDirs, make_settings, running_app

# Rounds of a batch-shaped layer stack: each step's [8, 80, 512] activations (1.3 MB, as a batch of 8 on
# the embedded model) allocated, written and freed as the next replaces them. Prints the minor page faults
# of the measured rounds.
WORKLOAD = """
import resource, sys, torch
from service import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
up, down = torch.ones(128, 512), torch.ones(512, 128)
def batch():
    x = torch.ones(8, 80, 128)
    for _ in range(8):
        h = x @ up
        h = torch.nn.functional.silu(h) * h
        x = h @ down
for _ in range(3):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

TENSOR_PAGES = 8 * 80 * 512 * 4 // 4096  # pages of one activation


def faults(mode: str, env: dict[str, str] | None = None) -> int:
    """Minor page faults of WORKLOAD's measured rounds in a fresh interpreter (`keep`: keep_freed_memory)."""
    done = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, timeout=120,
                          check=True, cwd=Path(__file__).resolve().parents[2], env=env)
    return int(done.stdout.strip())


@pytest.mark.skipif(not allocator.GLIBC, reason="glibc only")
def test_batches_reuse_freed_pages_instead_of_faulting_them_in() -> None:
    default, kept = faults("default"), faults("keep")
    assert default > 20 * TENSOR_PAGES  # the control: with glibc's defaults every round faults pages in again
    assert kept < TENSOR_PAGES  # a round reuses the last one's pages


@pytest.mark.anyio
@pytest.mark.parametrize("on", [True, False])
async def test_the_service_applies_it_at_start_up_by_setting(model_dirs: ModelDirs, on: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    async with running_app(make_settings(model_dirs, baseline_path=None, malloc_reuse=on)):
        assert calls == ([True] if on else [])
