"""A conversion worker dies with its server (issue 17, M3): kill -9 the process that owns the supervisor while
a job trains; the worker is gone within 5 s and the job shows failed (with a pending activation failed too).
Before the fix the worker, in its own session, trained on and later recorded `succeeded`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model_store import ModelStore
from tests.jobs.test_supervisor import SLOW, wait_for

# The "server": the part of it that matters here, a process running the job supervisor. Killing it with -9
# leaves nobody to reap or signal the worker: only the worker's own watchdog can end it.
_SERVER = textwrap.dedent("""
    import sys, time
    from model_store import ModelStore
    from service.admin.supervisor import JobSupervisor
    from service.settings import Settings
    supervisor = JobSupervisor(ModelStore(sys.argv[1]), Settings(job_threads=1, job_nice=0))
    supervisor.start()
    print("supervising", flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "plain-start"])
def test_kill_9_of_the_server_takes_the_worker_down(tiny_store: ModelStore, shapes_jsonl: Path,
                                                    forked: bool) -> None:
    """Whether the worker was forked by the fork server (its parent, which goes too; the worker watches the
    server's pidfd) or started as the server's own child (it watches for its re-parenting)."""
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(tiny_store.root)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                              "EAS_FORKSERVER": str(forked).lower()})
    worker_pid = None
    try:
        # Queued only once the supervisor runs: its start fails whatever a previous server left unfinished.
        assert server.stdout is not None and server.stdout.readline().strip() == "supervising"
        job = tiny_store.jobs.create("tiny", "v1", {**SLOW, "dataset": str(shapes_jsonl), "activate": True},
                                     activate=True)
        running = wait_for(lambda: (j if (j := tiny_store.jobs.get(job.id)).stage.startswith("train") else None))
        worker_pid = running.worker_pid
        assert worker_pid and _alive(worker_pid)
        parent = int(Path(f"/proc/{worker_pid}/stat").read_text().split(")")[-1].split()[1])
        assert (parent != server.pid) if forked else (parent == server.pid)
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed_at = time.monotonic()
        wait_for(lambda: not _alive(worker_pid), timeout_s=5.0)
        assert time.monotonic() - killed_at < 5.0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if worker_pid and _alive(worker_pid):  # never leave a trainer behind, even when the test fails
            os.killpg(worker_pid, signal.SIGKILL)
    failed = tiny_store.jobs.get(job.id)
    assert failed.status == "failed" and "server" in failed.error, failed
    assert failed.activation == "failed" and failed.activation_error
    assert [v.version for v in tiny_store.list_versions("tiny")] == ["v1"]
