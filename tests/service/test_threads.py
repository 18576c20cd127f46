"""Inference threads follow the CPUs the process may really use (service/cpu.py; issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cpu import cgroup_quota, inference_threads, usable_cpus
from service.runner.threads import ThreadBudget

ROOT = Path(__file__).resolve().parents[2]
# prepare_process, then torch: what `eas serve` does before the app is built.
CHILD = ("import json, os; from service.cpu import prepare_process; n = prepare_process(); import torch; "
         "print(json.dumps({'chosen': n, 'torch': torch.get_num_threads(), "
         "'policy': os.environ.get('OMP_WAIT_POLICY')}))")


def _child(cpus: set[int] | None, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=environment, capture_output=True, text=True,
                         timeout=120, check=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_threads_follow_a_restricted_affinity() -> None:
    mine = sorted(os.sched_getaffinity(0))
    pinned = _child({mine[0]})
    assert pinned == {"chosen": 1, "torch": 1, "policy": "PASSIVE"}
    if len(mine) > 2 and cgroup_quota() is None:  # negative control: with every CPU the count is larger
        assert _child(None)["torch"] == len(mine) - 1


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (8, 7), (64, 63)])
def test_one_cpu_is_left_to_the_server(monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int) -> None:
    """All usable CPUs but one go to torch (the event loop and preprocessing keep one), never fewer than 1."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("service.cpu.os.sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr("service.cpu.cgroup_quota", lambda root=None: None)
    assert inference_threads() == threads


def test_operator_settings_win() -> None:
    assert _child(None, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")["policy"] == "ACTIVE"
    assert _child(None, OMP_NUM_THREADS="1")["torch"] == 1


def test_budget_takes_the_configured_count() -> None:
    assert ThreadBudget(0, 3).full == 3
    assert inference_threads(5) == 5


def _fake_cgroup(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "proc").write_text(proc)
    return tmp_path, tmp_path / "proc"


@pytest.mark.parametrize(("files", "proc", "quota"), [
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),
    ({"pod/cpu.max": "100000 100000\n", "cpu.max": "max 100000\n"}, "0::/pod\n", 1.0),  # own cgroup first
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/\n0::/\n", 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/\n0::/\n", None),
    ({}, "0::/\n", None),
])
def test_cgroup_quota(tmp_path: Path, files: dict[str, str], proc: str, quota: float | None) -> None:
    root, proc_file = _fake_cgroup(tmp_path, files, proc)
    assert cgroup_quota(root, proc_file) == quota


def test_a_quota_caps_the_affinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc_file = _fake_cgroup(tmp_path, {"cpu.max": "150000 100000"}, "0::/\n")
    monkeypatch.setattr("service.cpu.cgroup_quota", lambda root: cgroup_quota(root, proc_file))
    assert usable_cpus(root) == 1  # 1.5 CPUs: a second thread would only wait at throttled barriers


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread niceness is a Linux feature")
@pytest.mark.parametrize("niceness", [0, 5])
def test_preprocessing_threads_run_at_their_niceness(niceness: int) -> None:
    import threading

    from service.preprocess import Preprocessor

    def own_niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = own_niceness()
    pre = Preprocessor(2, 1 << 20, 1, niceness=niceness)
    try:
        seen = {pre._pool.submit(own_niceness).result(10) for _ in range(4)}
    finally:
        pre._pool.shutdown()
        pre._large.shutdown()
    assert seen == {min(19, base + niceness)}  # niceness 0: the server's own (the negative control)
    assert own_niceness() == base  # the caller's thread is untouched
