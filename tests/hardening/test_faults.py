"""Faults around a serving process: the disk filling up while a new version is written to the model store,
and clients that hang up mid-request (queued, running, or halfway through sending the body), on a real
uvicorn on 127.0.0.1.

Covered elsewhere, not repeated here: a conversion worker killed mid-job (tests/jobs/test_supervisor.py),
corrupted model files refused at activation while the current model keeps serving
(tests/service/test_admin.py, tests/model_store/test_verify.py), ENOSPC/fsync/registry failures inside the
store's own steps (tests/model_store/test_versions.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_store import ModelStore, VersionWriteError
from tests.hardening.conftest import LiveServer, metric_values, start_server
from tests.model_store.helpers import tree
from tests.service.conftest import Gate, ModelDirs, image_bytes

Q = "what colour is the shape?"
MODEL = "tiny"
TOKEN = "fault-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _post(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/answer", files={"image": ("a.png", image_bytes(), "image/png")}, data={"question": Q})


# --- disk full while writing a version ---------------------------------------------------------------------

def test_disk_full_midway_through_a_new_version_leaves_the_store_and_serving_untouched(
    model_dirs: ModelDirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    store.import_directory(MODEL, model_dirs.eas, kind="baseline", activate=True)
    versions_before = [v.to_dict() for v in store.list_versions(MODEL)]

    # The weights file gets half its bytes onto the disk, then the disk is full. copytree (what the store's
    # import and the conversion export use) copies every file through shutil.copyfile.
    real_copyfile = shutil.copyfile
    half_written: list[int] = []

    def disk_fills_up(src: Any, dst: Any, *, follow_symlinks: bool = True) -> Any:
        if Path(src).name != "model.safetensors":
            return real_copyfile(src, dst, follow_symlinks=follow_symlinks)
        data = Path(src).read_bytes()
        with open(dst, "wb") as out:
            half_written.append(out.write(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    with start_server(model_dirs, model_path=None, baseline_path=None, model_store=store.root, model=MODEL,
                      admin_token=TOKEN) as live, live.client() as client:
        assert _post(client).json()["version"] == "v1"
        monkeypatch.setattr(shutil, "copyfile", disk_fills_up)
        with pytest.raises(VersionWriteError) as failure:
            store.import_directory(MODEL, model_dirs.baseline, kind="baseline", activate=True)
        monkeypatch.undo()

        assert half_written and half_written[0] > 0  # the fault really hit midway through the weights
        error = failure.value
        assert isinstance(error, OSError) and error.errno == errno.ENOSPC
        message = str(error)
        for needle in (repr(MODEL), "No space left on device", "model.safetensors", "no version was created"):
            assert needle in message, message
        # Nothing half-written anywhere, nothing for crash recovery to find, the registry as it was.
        assert tree(store.root / ".staging") == []
        assert sorted(p.name for p in (store.root / "models" / MODEL).iterdir()) == ["v1"]
        assert [v.to_dict() for v in store.list_versions(MODEL)] == versions_before
        assert store.active(MODEL).version == "v1"
        assert store.recover() == {"staging": [], "orphans": []}
        # The server keeps serving the previous active version and reports the store unchanged.
        answer = _post(client)
        assert answer.status_code == 200 and answer.json()["version"] == "v1"
        listed = client.get("/admin/models", headers=ADMIN).json()["models"]
        assert [(m["name"], m["active"], [v["version"] for v in m["versions"]]) for m in listed] == [
            (MODEL, "v1", ["v1"])]

        # With space again, the next write takes the number the failed one never registered, and activates.
        assert store.import_directory(MODEL, model_dirs.baseline, kind="baseline").version == "v2"
        activated = client.post(f"/admin/models/{MODEL}/versions/v2/activate", headers=ADMIN)
        assert activated.status_code == 200, activated.text
        assert _post(client).json()["version"] == "v2"


# --- clients that hang up ------------------------------------------------------------------------------

QUEUE = 3


@pytest.fixture(scope="module")
def gated(model_dirs: ModelDirs) -> Iterator[tuple[LiveServer, Gate]]:
    """One request at a time (batch size 1), a queue of QUEUE, and generation held by a gate."""
    gate = Gate()
    with start_server(model_dirs, loader=gate.loader(), max_batch_size=1, max_queue_size=QUEUE,
                      baseline_path=None) as live:
        yield live, gate


@pytest.fixture
def gate_closed(gated: tuple[LiveServer, Gate]) -> Iterator[tuple[LiveServer, Gate, Any]]:
    live, gate = gated
    batcher = live.app.state.service.registry.get("eas").batcher
    _wait_until(lambda: not batcher.busy)
    gate.batches.clear()
    gate.close()
    try:
        yield live, gate, batcher
    finally:
        gate.open()


def _raw_request() -> bytes:
    request = httpx.Request("POST", "http://127.0.0.1/v1/answer", files={"image": ("a.png", image_bytes())},
                            data={"question": Q})
    body = request.read()
    head = (f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _connect(live: LiveServer) -> socket.socket:
    host, port = live.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _counts(client: httpx.Client) -> dict[str, float]:
    """Client disconnects counted, answers by status code, and the queue depth, from /metrics."""
    text = client.get("/metrics").text
    counts: dict[str, float] = collections.defaultdict(float)
    for labels, value in metric_values(text, "eas_requests_total"):  # summed over route, model and variant
        counts[f"code {labels['code']}"] += value
    for labels, value in metric_values(text, "eas_requests_rejected_total"):
        counts[f"rejected {labels['reason']}"] += value
    counts["depth"] = sum(value for _, value in metric_values(text, "eas_queue_depth"))
    return counts


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()
            if k != "depth" and after.get(k, 0) != before.get(k, 0)}


def _fill_the_queue(pool: concurrent.futures.Executor, client: httpx.Client, batcher: Any) -> list:
    """With the worker held busy, QUEUE requests must all be admitted: a leaked slot would refuse the last
    with 429 and the queue would never fill."""
    burst = [pool.submit(_post, client) for _ in range(QUEUE)]
    _wait_until(lambda: batcher.pending == QUEUE or any(f.done() for f in burst))
    assert batcher.pending == QUEUE, [f.result().status_code for f in burst if f.done()]
    return burst


def test_client_gone_while_queued_is_withdrawn_and_its_slot_comes_back(gate_closed) -> None:
    live, gate, batcher = gate_closed
    with live.client() as client, concurrent.futures.ThreadPoolExecutor(QUEUE + 1) as pool:
        before = _counts(client)
        running = pool.submit(_post, client)
        assert gate.started.wait(10)
        abandoned = _connect(live)
        abandoned.sendall(_raw_request())
        _wait_until(lambda: batcher.pending == 1)
        abandoned.close()  # hang up while queued
        _wait_until(lambda: batcher.pending == 0)  # taken out of the queue, slot released

        burst = _fill_the_queue(pool, client, batcher)
        gate.open()
        assert running.result().status_code == 200
        assert [f.result().status_code for f in burst] == [200] * QUEUE
        after = _counts(client)

    assert gate.batches == [1] * (1 + QUEUE)  # the abandoned request never reached the model
    assert _delta(after, before) == {"code 200": 1 + QUEUE, "code 499": 1, "rejected client_disconnected": 1}
    assert after["depth"] == 0


def test_client_gone_while_running_leaves_the_server_healthy(gate_closed) -> None:
    live, gate, batcher = gate_closed
    with live.client() as client:
        before = _counts(client)
        abandoned = _connect(live)
        abandoned.sendall(_raw_request())
        assert gate.started.wait(10)  # its batch is running (a running batch is not interrupted)
        abandoned.close()
        _wait_until(lambda: _delta(_counts(client), before).get("rejected client_disconnected") == 1)
        gate.open()
        _wait_until(lambda: not batcher.busy)
        gate.close()
        with concurrent.futures.ThreadPoolExecutor(QUEUE + 1) as pool:  # a following burst all succeeds
            running = pool.submit(_post, client)
            assert gate.started.wait(10)
            burst = _fill_the_queue(pool, client, batcher)
            gate.open()
            assert [f.result().status_code for f in [running, *burst]] == [200] * (QUEUE + 1)
        after = _counts(client)
    assert _delta(after, before) == {"code 200": QUEUE + 1, "code 499": 1, "rejected client_disconnected": 1}
    assert after["depth"] == 0


# The first 5 KB of well-formed 100 KB bodies (so nothing is refused for being malformed before the hang-up).
HALF_BODIES = {
    "application/json": b'{"question": "what?", "image": "' + b"A" * 5000,
    "multipart/form-data; boundary=b0undary": b'--b0undary\r\nContent-Disposition: form-data; name="image"; '
                                              b'filename="a.png"\r\n\r\n\x89PNG\r\n\x1a\n' + b"\0" * 5000,
}


def test_client_gone_halfway_through_its_body_is_not_a_server_error(
    gated: tuple[LiveServer, Gate], caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette raises ClientDisconnect while reading a body whose sender hung up; that used to fall through
    to the catch-all handler: an ERROR traceback in the log and a 500 in eas_requests_total (5xx alerts)."""
    live, _ = gated
    caplog.set_level(logging.ERROR)
    with live.client() as client:
        before = _counts(client)
        for content_type, start in HALF_BODIES.items():
            sock = _connect(live)
            sock.sendall(f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                         "Content-Length: 100000\r\n\r\n".encode() + start)
            time.sleep(0.1)  # let the server start reading the body
            sock.close()
        _wait_until(lambda: _delta(_counts(client), before).get("rejected client_disconnected") == 2)
        assert _post(client).status_code == 200
        after = _counts(client)
    assert _delta(after, before) == {"code 200": 1, "code 499": 2, "rejected client_disconnected": 2}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
