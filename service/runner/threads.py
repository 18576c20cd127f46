"""How many CPU threads inference may use right now.

A conversion worker takes cores away from the server. torch's intra-op (OpenMP) regions then wait at
every barrier for a thread whose core is busy: measured on 2 cores with a tiny model, batch-1 p50 went from
22 ms to 400–500 ms while a conversion trained. Lowering the server's threads to the cores left free
while a job runs removes that (p50 22 ms → 22 ms; docs/admin.md). OpenMP thread counts belong to the
calling thread, so each inference thread applies the budget itself before a batch (`apply`).

The full budget comes from the CPUs the process may use (service/cpu.py), which `eas serve` also hands to
OpenMP, with a passive wait policy, before torch loads.
"""

from __future__ import annotations

import os
import threading

import torch

from service.cpu import inference_threads, usable_cpus


def job_thread_count(configured: int) -> int:
    """Threads a conversion worker gets: `configured` (Settings.job_threads), or all cores but one when 0.
    The supervisor passes this number to the worker and the budget below subtracts it, so both agree."""
    return configured or max(1, len(os.sched_getaffinity(0)) - 1)


class ThreadBudget:
    def __init__(self, job_threads: int = 0, threads: int = 0) -> None:
        # Inference threads when no job runs: `threads` (Settings.inference_threads) or the CPUs this process
        # may really use (service/cpu.py: affinity and cgroup quota, not the host's core count).
        self.full = inference_threads(threads)
        self.job_threads = job_threads  # Settings.job_threads, resolved by job_thread_count when jobs run
        self._workers = 0
        self._lock = threading.Lock()

    def set_running_jobs(self, running: int) -> None:
        with self._lock:
            self._workers = running

    @property
    def threads(self) -> int:
        if self._workers == 0:
            return self.full
        cores = usable_cpus()
        return max(1, min(self.full, cores - job_thread_count(self.job_threads) * self._workers))

    def apply(self) -> int:
        """Set this thread's torch thread count to the budget (cheap when unchanged); returns it."""
        wanted = self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return wanted
