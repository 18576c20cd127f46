"""A server's processes as the benchmarks measure them: the server and its children (its model processes,
service/runner/process.py; LitServe's workers), their CPU time and resident memory together (psutil)."""

from __future__ import annotations

import contextlib

import psutil


def process_tree(root: psutil.Process | int) -> list[psutil.Process]:
    """`root` and every process below it, as they are now."""
    process = root if isinstance(root, psutil.Process) else psutil.Process(root)
    return [process, *process.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU time of `processes` together; one that has exited counts nothing."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def tree_rss(root: psutil.Process) -> int:
    """Resident memory of `root` and its children together, in bytes."""
    total = 0
    for process in process_tree(root):
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total
