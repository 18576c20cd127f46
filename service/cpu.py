"""How many CPUs this process may really use, and the OpenMP set-up that follows from it (torch-free).

The host's core count is the wrong number for a server: a container's CPU quota (cgroup v2 `cpu.max`,
v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) or a CPU affinity mask (`taskset`, a cpuset) can give it
fewer. torch sizes its intra-op pool from the cores it sees, and OpenMP's default wait policy spins at
every barrier: when a pool thread's core is busy with another process, the others spin until it is
scheduled. Measured on the shared 2-core machine (issue 18): 2 threads beside a CPU-bound neighbour ran
8–12x slower than 1 thread; `OMP_WAIT_POLICY=PASSIVE` brought 2 threads back to 0.86x of 1 thread.

`prepare_process` runs in `eas serve` before torch is imported (OpenMP reads its environment once, when
the library loads): it sets `OMP_WAIT_POLICY=PASSIVE` and `OMP_NUM_THREADS` to the usable CPU count less one,
each only where the environment does not already say otherwise. `EAS_INFERENCE_THREADS` overrides the
count (service/settings.py); the runners apply it per inference thread (service/runner/threads.py).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT_POLICY = "PASSIVE"


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (taskset, cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 = 150 ms per 100 ms), or None when unlimited."""
    v2_path, v1_path = "", ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                v2_path = path
            elif "cpu" in controllers.split(","):
                v1_path = path
    except (OSError, ValueError):
        pass
    # The process's own cgroup first; inside a container the namespace root (`/`) is the same directory.
    for directory in _candidates(root, v2_path):
        text = _read(directory / "cpu.max")
        if text is not None:
            quota, _, period = text.partition(" ")
            if quota == "max":
                return None
            return _ratio(quota, period or "100000")
    for directory in _candidates(root / "cpu", v1_path) + _candidates(root / "cpu,cpuacct", v1_path):
        quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return None if quota.startswith("-") else _ratio(quota, period)
    return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process may use: the affinity mask, capped by the cgroup quota (at least 1).
    A fractional quota rounds down: a thread beyond the quota only adds throttled barrier waits."""
    cpus = affinity_cpus()
    quota = cgroup_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def inference_threads(configured: int = 0) -> int:
    """Intra-op threads for inference: `configured` (EAS_INFERENCE_THREADS) when set, else an operator's
    `OMP_NUM_THREADS`, else all usable CPUs but one (at least one).

    The CPU left over is the server's own: its event loop, the preprocessing pool (image decode, processor)
    and the batch worker's Python between matrix multiplies all run beside torch's pool, and a pool that
    takes every CPU makes each of its barriers wait for threads the server's own work has descheduled.
    Measured on the 2-core machine (docs/serving.md, "Threads"): 1 thread served 1.36x the requests of 2
    passive threads at one client and 1.14x at 16, with no neighbour; beside a CPU-bound neighbour 1.0-1.1x.
    """
    if configured > 0:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() - 1)


def prepare_process(configured: int = 0) -> int:
    """Set OpenMP's environment for inference, before torch loads; returns the thread count chosen.

    Variables already set are left alone (an operator's `OMP_WAIT_POLICY=ACTIVE` wins). When torch is
    already imported the environment is too late, so the count is applied through torch instead."""
    threads = inference_threads(configured)
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def _candidates(base: Path, path: str) -> list[Path]:
    own = base / path.lstrip("/") if path and path != "/" else base
    return [own] if own == base else [own, base]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
