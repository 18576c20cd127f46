"""Model processes forked from the fork server (service/runner/forkserver.py, Settings.forkserver):
they answer as a plainly started model process does, share one fork server per environment, take the
caller's environment and working directory, report how they ended, and the plain start takes over when
the fork server fails."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from eas.model.loading import LoadedModel, load_model
from service.lifecycle import default_loader
from service.runner import forkserver
from service.runner.forkserver import ForkedProcess
from service.runner.process import ModelProcessGone, ProcessRunner
from service.runner.runner import VariantInfo
from service.runner.threads import ThreadBudget
from service.settings import Settings
from tests.service.conftest import ModelDirs, image_bytes
from tests.service.test_model_process import QUESTION, _alive, _Item, slow_loader


def probing_loader(info: VariantInfo, settings: Settings) -> LoadedModel:
    """The default loader, which first writes what the process it runs in sees to $EAS_TEST_PROBE (importable
    by name, so it crosses to the model process)."""
    probe = os.environ.get("EAS_TEST_PROBE")
    if probe:
        import random

        import numpy
        import torch

        Path(probe).write_text(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(),
                                           "marker": os.environ.get("EAS_TEST_MARKER"),
                                           "seeds": [torch.initial_seed(), random.random(),
                                                     float(numpy.random.random())]}))
    return default_loader(info, settings)


def _runner(directory: Path, *, forked: bool = True, loader: Any = default_loader) -> ProcessRunner:
    info = VariantInfo(variant="eas", model="tiny", version="v1", kind="local", path=directory)
    settings = Settings(device="cpu", dtype="fp32", model_process=True, forkserver=forked)
    return ProcessRunner(loader(info, settings), info, ThreadBudget(threads=1), loader=loader, settings=settings,
                         max_rows=4)


def _loaded(runner: ProcessRunner) -> None:
    """Wait until the runner's model process has loaded (it has then run the loader)."""
    with runner._lock:
        runner._await_ready()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().split(")")[-1].split()[1])


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return None


@pytest.fixture
def fresh_servers() -> Iterator[None]:
    """Tests that break fork servers or add some start from none and leave none behind."""
    forkserver.close_all()
    yield
    forkserver.close_all()


@pytest.fixture(scope="module")
def expected(model_dirs: ModelDirs) -> str:
    direct = load_model(model_dirs.eas, device="cpu", dtype="fp32")
    return direct.answer([Image.open(io.BytesIO(image_bytes()))], [QUESTION], 6)[0]


def _answer(runner: ProcessRunner) -> str:
    features = runner.model.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
    return runner.run_batch([_Item(features, 6)])[0].text


def test_model_processes_fork_from_one_server_and_answer_as_a_plain_start(model_dirs: ModelDirs,
                                                                         expected: str) -> None:
    """Two forked model processes share one fork server (their parent) and answer as the in-process model does;
    the negative control, the setting off, starts the model process as the server's own child."""
    runners = [_runner(model_dirs.eas), _runner(model_dirs.eas), _runner(model_dirs.eas, forked=False)]
    try:
        answers = [_answer(runner) for runner in runners]
        assert answers == [expected] * 3
        forked, also_forked, plain = (runner._process for runner in runners)
        assert isinstance(forked, ForkedProcess) and isinstance(also_forked, ForkedProcess)
        assert not isinstance(plain, ForkedProcess)
        server = forkserver._servers[forkserver._environment_key()]
        assert _ppid(forked.pid) == _ppid(also_forked.pid) == server.process.pid != os.getpid()
        assert _ppid(plain.pid) == os.getpid()
    finally:
        for runner in runners:
            runner.close()
    assert not any(_alive(pid) for pid in (forked.pid, also_forked.pid, plain.pid))


def test_a_forked_process_takes_the_callers_environment_and_directory(model_dirs: ModelDirs, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      fresh_servers: None) -> None:
    """What the server's environment holds at the fork reaches the model process, not what the fork server
    started with (it lacks the marker: the negative control); an EAS_* variable does not need a new fork
    server, another variable does (the fork server's imports may have read it)."""
    first = _runner(model_dirs.eas)
    try:
        server_pid = forkserver._servers[forkserver._environment_key()].process.pid
        probe = tmp_path / "probe.json"
        monkeypatch.setenv("EAS_TEST_PROBE", str(probe))
        monkeypatch.setenv("EAS_TEST_MARKER", "from-the-request")
        monkeypatch.chdir(tmp_path)
        second = _runner(model_dirs.eas, loader=probing_loader)
        try:
            _loaded(second)
            seen = json.loads(probe.read_text())
            seeds = seen.pop("seeds")
            assert seen == {"pid": second.pid, "cwd": str(tmp_path), "marker": "from-the-request"}
            assert _ppid(second.pid) == server_pid  # the same fork server
            # Each fork draws its own random numbers, as a fresh process would (not the fork server's).
            again = _runner(model_dirs.eas, loader=probing_loader)
            try:
                _loaded(again)
                others = json.loads(probe.read_text())["seeds"]
                assert _ppid(again.pid) == server_pid and all(a != b for a, b in zip(seeds, others, strict=True))
            finally:
                again.close()
            with open(f"/proc/{server_pid}/environ", "rb") as environ:
                assert b"EAS_TEST_MARKER" not in environ.read()
            monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE" if os.environ.get("OMP_WAIT_POLICY") != "ACTIVE"
                               else "PASSIVE")
            third = _runner(model_dirs.eas)
            try:
                assert _ppid(third.pid) != server_pid and len(forkserver._servers) == 2
            finally:
                third.close()
        finally:
            second.close()
    finally:
        first.close()


def test_how_a_forked_process_ended_is_reported_and_it_is_reaped(model_dirs: ModelDirs, expected: str) -> None:
    """kill -9 of a forked model process during a batch: the batch fails naming exit code -9 (the fork server
    reaps the process when asked for it, so until then it is its zombie), and the next batch forks a new one."""
    runner = _runner(model_dirs.eas, loader=slow_loader)
    try:
        assert _answer(runner) == expected
        process = runner._process
        assert isinstance(process, ForkedProcess)
        timer = threading.Timer(0.1, os.kill, (process.pid, signal.SIGKILL))
        runner.on_sent = timer.start  # once the batch is in the child
        features = runner.model.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
        with pytest.raises(ModelProcessGone, match=r"exit code -9"):
            runner.run_batch([_Item(features, 200)])  # 30 ms a step: still running when it is killed
        timer.join()
        runner.on_sent = None
        assert _state(process.pid) is None  # reaped
        assert _answer(runner) == expected and runner.restarts == 1
        assert isinstance(runner._process, ForkedProcess) and runner._process.pid != process.pid
        # Until the server asks, the fork server leaves a dead process as its zombie (so its status is there).
        dead = runner._process
        os.kill(dead.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(dead.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(dead.pid) == "Z"
        assert dead.wait(10) == -signal.SIGKILL and _state(dead.pid) is None
    finally:
        runner.close()


def test_a_failed_fork_server_gives_way_to_the_plain_start(model_dirs: ModelDirs, expected: str,
                                                           fresh_servers: None,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The fork server killed: the next model process starts the plain way (the server's own child), with a
    warning, and answers; the failed fork server is not asked again."""
    first = _runner(model_dirs.eas)
    try:
        server = forkserver._servers[forkserver._environment_key()]
        server.process.kill()
        server.process.wait(10)
        with caplog.at_level(logging.WARNING, logger="service.runner.forkserver"):
            second = _runner(model_dirs.eas)
        try:
            assert not isinstance(second._process, ForkedProcess) and _ppid(second.pid) == os.getpid()
            assert any("fork server failed" in record.getMessage() for record in caplog.records)
            assert server.failed and _answer(second) == expected
            assert forkserver._server_for(dict(os.environ)) is None  # not asked again: the plain start it is
        finally:
            second.close()
        assert _answer(first) == expected  # a forked process outlives its fork server (it watches the server)
    finally:
        first.close()
