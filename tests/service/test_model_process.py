"""Each variant's model in a process of its own (service/runner/process.py, Settings.model_process).

With `serve_lone_here` off, the parent's copy of the weights is moved to the meta device once the child is up,
so an answer that comes back right can only have been computed by the child. With it on (the default), the two
share one copy, and an idle server's lone request runs in the parent: tests at the end."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import BatchFeature

from eas.model.loading import LoadedModel, load_model
from service.batching.work import Sampling
from service.lifecycle import default_loader, uses_model_process
from service.runner.process import ModelProcessError, Packed, ProcessRunner, from_wire, pack, to_wire, unpack
from service.runner.runner import VariantInfo
from service.runner.threads import ThreadBudget
from service.settings import Settings
from tests.service.conftest import ModelDirs, image_bytes, make_settings, running_app
from tests.service.test_batching import wait_until

QUESTION = "what colour is the circle?"


def slow_loader(info: VariantInfo, settings: Settings) -> LoadedModel:
    """The default loader, with every forward pass of the language model slowed by 30 ms (importable by
    name, so it can cross to the model process)."""
    model = default_loader(info, settings)
    model.model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    return model


def hanging_loader(info: VariantInfo, settings: Settings) -> LoadedModel:
    """The default loader, whose model hangs in any forward pass of a batch of two (warm-up has one row)."""
    model = default_loader(info, settings)

    def hang(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] == 2:
            time.sleep(3600)

    model.model.register_forward_pre_hook(hang, with_kwargs=True)
    return model


@pytest.fixture(scope="module")
def direct(model_dirs: ModelDirs) -> LoadedModel:
    return load_model(model_dirs.eas, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
async def served(model_dirs: ModelDirs):
    # model_process=None: the default, which is on for a CPU model and the service's own loader. On the CPU
    # even where the suite serves on a GPU (EAS_TEST_DEVICE): the model process is the CPU's default only.
    # serve_lone_here=False: every request goes to the child (the lone-request path has its own tests below).
    async with running_app(make_settings(model_dirs, baseline_path=None, load_baseline=False,
                                         model_process=None, device="cpu", dtype="fp32",
                                         serve_lone_here=False)) as pair:
        yield pair


def _runner(app: Any) -> ProcessRunner:
    runner = app.state.service.registry.get("eas").runner
    assert isinstance(runner, ProcessRunner)
    return runner


def _url(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chat(png: bytes, **extra: Any) -> dict[str, Any]:
    return {"model": "eas", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _url(png)}}, {"type": "text", "text": QUESTION}]}], **extra}


# --- the decision --------------------------------------------------------------------------------------

def test_default_is_on_for_the_cpu_with_the_services_loader(model_dirs: ModelDirs) -> None:
    auto = make_settings(model_dirs, model_process=None, device="cpu", dtype="fp32")
    assert uses_model_process(auto, default_loader)
    assert not uses_model_process(auto, lambda info, settings: default_loader(info, settings))  # a test's stand-in
    assert not uses_model_process(make_settings(model_dirs, model_process=False), default_loader)
    assert uses_model_process(make_settings(model_dirs, model_process=True, device="cpu"), default_loader)


def test_env_variable_reaches_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAS_MODEL_PROCESS", "true")
    assert Settings().model_process is True
    monkeypatch.setenv("EAS_MODEL_PROCESS", "false")
    assert Settings().model_process is False
    monkeypatch.delenv("EAS_MODEL_PROCESS")
    assert Settings().model_process is None


# --- the wire format -----------------------------------------------------------------------------------

def test_tensors_cross_as_arrays_and_come_back_equal() -> None:
    generator = torch.Generator().manual_seed(0)
    value = BatchFeature({
        "input_ids": torch.randint(0, 1000, (1, 7), generator=generator),
        "pixel_values": torch.randn(1, 3, 8, 8, generator=generator).to(torch.bfloat16),
        "image_sizes": [torch.tensor([8, 8]), (torch.ones(2, dtype=torch.float16), "text")],
    })
    for back in (from_wire(to_wire(value)), unpack(pack(value)), unpack(to_wire(value))):
        _assert_same_features(back, value)
    assert isinstance(pack(value), Packed) and isinstance(pack(value).data, bytes)
    # Negative control: a changed value does not compare equal after the trip.
    changed = value["input_ids"].clone()
    changed[0, 0] += 1
    assert not torch.equal(from_wire(to_wire(changed)), value["input_ids"])
    assert not torch.equal(unpack(pack(changed)), value["input_ids"])


def _assert_same_features(back: Any, value: BatchFeature) -> None:
    assert isinstance(back, BatchFeature)
    assert torch.equal(back["input_ids"], value["input_ids"])
    assert back["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(back["pixel_values"].view(torch.int16), value["pixel_values"].view(torch.int16))
    assert torch.equal(back["image_sizes"][0], value["image_sizes"][0])
    assert back["image_sizes"][1][0].dtype == torch.float16 and back["image_sizes"][1][1] == "text"


def test_tensors_that_need_detaching_or_a_copy_cross_too() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()  # not contiguous
    assert torch.equal(from_wire(to_wire(transposed)), transposed)
    weights = torch.ones(2, 2, requires_grad=True)
    back = from_wire(to_wire(weights * 3))
    assert torch.equal(back, torch.full((2, 2), 3.0)) and not back.requires_grad


@pytest.mark.parametrize("size", [10, 100_000, 3_000_000])
def test_a_message_is_one_frame_connection_reads_even_past_the_socket_buffer(size: int,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import socket
    import threading
    from multiprocessing.connection import Connection

    from service.runner import process

    writes: list[int] = []
    real_writev = os.writev

    def counting(fd: int, buffers: list) -> int:
        written = real_writev(fd, buffers)
        writes.append(written)
        return written

    monkeypatch.setattr(process.os, "writev", counting)
    ours, theirs = socket.socketpair()  # default buffers: 3 MB waits for the reader to drain them
    sender, receiver = Connection(ours.detach()), Connection(theirs.detach())
    message = ("batch", b"x" * size, [1, 2, 3])
    received: list = []
    reader = threading.Thread(target=lambda: received.append(process._recv(receiver)))
    reader.start()
    process._send(sender, message)
    reader.join(10)
    assert received == [message]
    if size <= 100_000:  # fits the buffer: length and payload in one write (Connection makes two)
        assert len(writes) == 1
    sender.close()
    receiver.close()


# --- served through the child --------------------------------------------------------------------------

@pytest.mark.anyio
async def test_answers_come_from_the_child_and_equal_the_in_process_model(served, direct: LoadedModel,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = served
    runner = _runner(app)
    sent: list[type] = []  # what each row's features were when its batch was sent
    message = runner._batch_message
    monkeypatch.setattr(runner, "_batch_message", lambda items: (sent.extend(type(i.features) for i in items),
                                                                  message(items))[1])
    assert runner.pid is not None and runner.pid != os.getpid()
    # The parent holds no weights: it could not have computed these answers.
    assert all(p.device.type == "meta" for p in runner.model.model.parameters())
    cases = [image_bytes((200, 30, 30)), image_bytes((30, 160, 30), (64, 48), shape="rectangle"),
             image_bytes((30, 30, 200), (40, 56))]
    responses = await asyncio.gather(*(client.post("/v1/answer", json={
        "image": _url(png).split(",", 1)[1], "question": QUESTION, "max_new_tokens": 6}) for png in cases))
    for png, response in zip(cases, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == direct.answer([Image.open(io.BytesIO(png))], [QUESTION], 6)[0]
    # Prepared requests were packed for the child where they were prepared, not by the batch worker.
    assert sent and set(sent) == {Packed}
    info = (await client.get("/info")).json()
    served_info = next(v for v in info["variants"] if v["variant"] == "eas")
    assert served_info["device"] == "cpu" and served_info["dtype"] == "float32"


@pytest.mark.anyio
async def test_tokens_stream_from_the_child(served, direct: LoadedModel) -> None:
    _, client = served
    png = image_bytes()
    expected = direct.answer([Image.open(io.BytesIO(png))], [QUESTION], 8)[0]
    response = await client.post("/v1/chat/completions", json=_chat(png, stream=True, max_tokens=8))
    assert response.status_code == 200
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    deltas = [d for d in deltas if d]
    assert len(deltas) > 1 and "".join(deltas) == expected


@pytest.mark.anyio
async def test_seeded_sampling_and_stop_in_the_child(served) -> None:
    _, client = served
    png = image_bytes()

    async def content(**extra: Any) -> str:
        response = await client.post("/v1/chat/completions", json=_chat(png, max_tokens=8, **extra))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    sampled = [await content(temperature=1.5, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]
    greedy = await content(temperature=0)
    assert greedy == await content()
    stop = greedy.strip()[-1]
    assert await content(stop=[stop]) == greedy[:greedy.index(stop)].strip()


@pytest.mark.anyio
async def test_a_dead_child_is_replaced_and_the_service_answers_again(served) -> None:
    app, client = served
    runner = _runner(app)
    old = runner.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    body = {"image": _url(image_bytes()).split(",", 1)[1], "question": QUESTION, "max_new_tokens": 4}
    statuses = []
    for _ in range(3):  # the batch that meets the dead child fails (500), the next one restarts it
        statuses.append((await client.post("/v1/answer", json=body)).status_code)
        if statuses[-1] == 200:
            break
    assert statuses[-1] == 200 and set(statuses) <= {200, 500}
    assert runner.pid not in (None, old) and runner.restarts >= 1


@pytest.mark.anyio
async def test_hot_activation_starts_a_new_child_and_stops_the_old(served, model_dirs: ModelDirs) -> None:
    app, client = served
    service = app.state.service
    old = _runner(app)
    old_pid = old.pid
    assert old_pid is not None
    info = VariantInfo(variant="eas", model="tiny-llava", version="v2", kind="local", path=model_dirs.eas)
    await service.replace_variant(info, default=True)
    new = _runner(app)
    assert new is not old and new.pid not in (None, old_pid)
    assert old.pid is None and not _alive(old_pid)  # retired: its child stopped
    body = {"image": _url(image_bytes()).split(",", 1)[1], "question": QUESTION, "max_new_tokens": 4}
    response = await client.post("/v1/answer", json=body)
    assert response.status_code == 200 and response.json()["version"] == "v2"


@pytest.mark.anyio
async def test_shadow_mirrors_cross_to_the_baselines_child(model_dirs: ModelDirs) -> None:
    """Mirrored requests carry a decoded image, not prepared tensors: the child prepares them itself."""
    from tests.hardening.conftest import metric_values

    settings = make_settings(model_dirs, baseline_path=model_dirs.eas, shadow_fraction=1.0,
                             shadow_max_queue_depth=8, model_process=True, serve_lone_here=False)
    async with running_app(settings) as (app, client):
        colours = [(200, 30, 30), (30, 160, 30), (30, 30, 200)]
        for colour in colours:
            response = await client.post("/v1/answer", json={
                "image": _url(image_bytes(colour)).split(",", 1)[1], "question": QUESTION})
            assert response.status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # mirrors start on the loop's next turn after each answer
            await asyncio.sleep(0.05)
            text = (await client.get("/metrics")).text
            done = sum(v for _, v in metric_values(text, "eas_shadow_requests_total"))
            if done >= len(colours) and not app.state.shadow.pending:
                break
    outcomes = {labels["outcome"]: v for labels, v in metric_values(text, "eas_shadow_requests_total")}
    agreement = {labels["result"]: v for labels, v in metric_values(text, "eas_shadow_agreement_total")}
    assert outcomes.get("completed") == len(colours)
    assert agreement.get("match") == len(colours) and not agreement.get("mismatch")


# --- the runner itself: cancellation, close, parent death ----------------------------------------------

class _Item:
    def __init__(self, features: Any, max_new_tokens: int, sink: Any = None, deadline_s: float = 60.0) -> None:
        self.question, self.max_new_tokens, self.sampling = QUESTION, max_new_tokens, Sampling()
        self.sink, self.cancelled, self.features, self.image, self.tokens = sink, threading.Event(), features, None, 0
        self.deadline = time.monotonic() + deadline_s


def _process_runner(directory: Path, loader: Any = slow_loader) -> ProcessRunner:
    info = VariantInfo(variant="eas", model="tiny", version="v1", kind="local", path=directory)
    settings = Settings(device="cpu", dtype="fp32", model_process=True)
    return ProcessRunner(loader(info, settings), info, ThreadBudget(threads=1), loader=loader, settings=settings,
                         max_rows=4)


def test_a_cancelled_row_stops_in_the_child_and_close_stops_it(model_dirs: ModelDirs) -> None:
    runner = _process_runner(model_dirs.eas)
    try:
        features = runner.model.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
        got: list[str] = []
        # on_sent (the Batcher's flush of the batch before) runs once the batch is in the child, before any token
        runner.on_sent = lambda: got.append("<sent>")
        cancel_me = _Item(features, 40, sink=lambda delta: (got.append(delta), cancel_me.cancelled.set()))
        keep = _Item(features, 12)
        cancelled, finished = runner.run_batch([cancel_me, keep])
        assert got[0] == "<sent>" and got.count("<sent>") == 1
        assert got[1:], "the streamed row never produced a token"
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 12
        assert finished.finish_reason in ("length", "stop")
        assert finished.completion_tokens >= cancelled.completion_tokens
        pid = runner.pid
    finally:
        runner.close()
    # close() stops the child, and the runner refuses batches from then on.
    assert pid is not None and not _alive(pid) and runner.pid is None
    with pytest.raises(ModelProcessError, match="stopped"):
        runner.run_batch([_Item(None, 2)])


def test_a_stuck_child_is_killed_past_its_batchs_deadlines(model_dirs: ModelDirs,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import service.runner.process as process

    monkeypatch.setattr(process, "STUCK_GRACE_S", 0.5)
    runner = _process_runner(model_dirs.eas, hanging_loader)
    try:
        features = runner.model.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
        runner.run_batch([_Item(features, 2)])  # one row: loads the child, answers
        stuck = runner.pid
        started = time.monotonic()
        with pytest.raises(ModelProcessError, match="killed"):
            runner.run_batch([_Item(features, 2, deadline_s=0.5), _Item(features, 2, deadline_s=0.5)])
        assert time.monotonic() - started < 10 and stuck is not None and not _alive(stuck)
        assert len(runner.run_batch([_Item(features, 2)])) == 1  # a new child serves the next batch
        assert runner.restarts == 1
    finally:
        runner.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting to be reaped is gone for our purposes
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "plain-start"])
def test_the_child_dies_with_its_parent(model_dirs: ModelDirs, tmp_path: Path, forked: bool) -> None:
    """kill -9 of the server: its model process goes within seconds, whether forked by the fork server (which
    goes too) or started as the server's own child."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.service.test_model_process import _process_runner
        from service.lifecycle import default_loader
        from service.runner import forkserver
        from pathlib import Path
        if __name__ == "__main__":
            runner = _process_runner(Path({str(model_dirs.eas)!r}), default_loader)
            servers = [server.process.pid for server in forkserver._servers.values()]
            print(runner.pid, *servers, flush=True)
            time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1",
                                   "EAS_FORKSERVER": str(forked).lower()})
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.split() and all(word.isdigit() for word in line.split()), f"no pids from the parent: {line!r}"
        child, *servers = (int(word) for word in line.split())
        assert len(servers) == (1 if forked else 0)
        assert _alive(child) and all(_alive(server) for server in servers)
        parent.kill()  # kill -9: no atexit, no cleanup in the parent
        parent.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in (child, *servers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the model process outlived its parent by more than 5 s"
        assert not any(_alive(server) for server in servers), "the fork server outlived the server by 5 s"
    finally:
        parent.kill()


# --- a lone request, sent from the event loop (Batcher's `submit`) -----------------------------------------

@pytest.mark.anyio
async def test_a_lone_request_is_sent_from_the_event_loop_and_others_go_through_the_worker(
        served, model_dirs: ModelDirs, direct: LoadedModel) -> None:
    """One request at a time reaches the child from the loop; requests that find the variant busy queue for
    the worker, which never runs beside a batch sent from the loop. Negative control: with the setting off,
    nothing is sent from the loop and the answers are the same."""
    pngs = [image_bytes((200, 30, 30)), image_bytes((30, 160, 30), (64, 48), shape="rectangle"),
            image_bytes((30, 30, 200), (40, 56))]
    expected = [direct.answer([Image.open(io.BytesIO(png))], [QUESTION], 6)[0] for png in pngs]

    async def counts(app: Any, client: Any) -> tuple[int, int]:
        batcher = app.state.service.registry.get("eas").batcher

        async def ask(png: bytes) -> str:
            response = await client.post("/v1/answer", json={
                "image": _url(png).split(",", 1)[1], "question": QUESTION, "max_new_tokens": 6})
            assert response.status_code == 200, response.text
            return response.json()["answer"]

        before = batcher.sent_from_loop
        one_by_one = [await ask(png) for png in pngs]
        lone = batcher.sent_from_loop
        together = await asyncio.gather(*(ask(png) for png in pngs))
        assert one_by_one == expected and list(together) == expected
        return lone - before, batcher.sent_from_loop - lone

    on = await counts(*served)  # the default setting
    settings = make_settings(model_dirs, baseline_path=None, load_baseline=False, model_process=True,
                             device="cpu", dtype="fp32", dispatch_from_loop=False, serve_lone_here=False)
    async with running_app(settings) as pair:
        off = await counts(*pair)
    assert on[0] == len(pngs)  # every lone request went from the loop
    assert on[1] < len(pngs)  # at least one of the concurrent ones found the variant busy
    assert off == (0, 0)


@pytest.fixture(scope="module")
def slow_runner(model_dirs: ModelDirs):
    runner = _process_runner(model_dirs.eas)
    yield runner
    runner.close()


async def _from_loop(runner: ProcessRunner, items: list[Any]) -> Any:
    future = asyncio.get_running_loop().create_future()
    assert runner.submit(items, future.set_result)
    return await asyncio.wait_for(future, 60)


@pytest.mark.anyio
async def test_a_batch_from_the_loop_streams_cancels_and_holds_the_child_until_it_is_over(
        slow_runner: ProcessRunner) -> None:
    runner = slow_runner
    features = runner.model.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
    assert not runner._ready and not runner.submit([_Item(features, 2)], lambda outcome: None)  # the worker's job
    await asyncio.to_thread(runner.run_batch, [_Item(features, 2)])  # waits for the child to load
    got: list[str] = []
    cancel_me = _Item(features, 40, sink=lambda delta: (got.append(delta), cancel_me.cancelled.set()))
    future = asyncio.get_running_loop().create_future()
    assert runner.submit([cancel_me], future.set_result)
    assert not runner.submit([_Item(features, 2)], lambda outcome: None)  # one batch at a time
    worker = asyncio.ensure_future(asyncio.to_thread(runner.run_batch, [_Item(features, 3)]))
    (cancelled,) = await asyncio.wait_for(future, 60)
    assert got and cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 40
    (after,) = await asyncio.wait_for(worker, 60)  # the worker's batch waited for the lock, then ran
    assert after.completion_tokens >= 1
    (again,) = await _from_loop(runner, [_Item(features, 2)])
    assert again.completion_tokens >= 1

    def broken(delta: str) -> None:
        raise RuntimeError("the event loop is closed")

    # A sink that raises (its loop gone) on the worker's path: the child, which would go on and send this
    # batch's reply to the next one, is stopped with it. (The module's later test needs no child.)
    with pytest.raises(ModelProcessError, match="sink failed"):
        await asyncio.to_thread(runner.run_batch, [_Item(features, 8, sink=broken)])
    assert runner.pid is None


@pytest.mark.anyio
async def test_a_dead_or_stuck_child_fails_the_batch_from_the_loop_and_the_next_batch_restarts_it(
        model_dirs: ModelDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.runner.process as process

    monkeypatch.setattr(process, "STUCK_GRACE_S", 0.5)
    runner = _process_runner(model_dirs.eas, hanging_loader)
    try:
        features = runner.model.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
        await asyncio.to_thread(runner.run_batch, [_Item(features, 2)])
        stuck = runner.pid
        started = time.monotonic()
        outcome = await _from_loop(runner, [_Item(features, 2, deadline_s=0.5), _Item(features, 2, deadline_s=0.5)])
        assert isinstance(outcome, ModelProcessError) and "killed" in str(outcome)
        assert time.monotonic() - started < 10 and stuck is not None and not _alive(stuck)
        assert not runner.submit([_Item(features, 2)], lambda outcome: None)  # no child: the worker starts one
        await asyncio.to_thread(runner.run_batch, [_Item(features, 2)])
        dying = runner.pid
        assert dying not in (None, stuck)
        future = asyncio.get_running_loop().create_future()
        assert runner.submit([_Item(features, 2), _Item(features, 2)], future.set_result)  # hangs: batch of two
        os.kill(dying, signal.SIGKILL)
        outcome = await asyncio.wait_for(future, 30)
        assert isinstance(outcome, ModelProcessError) and "exited during a batch" in str(outcome)
        assert runner.pid is None and runner.restarts == 1  # gone; the next batch starts one, as after `stuck`
    finally:
        await asyncio.to_thread(runner.close)


@pytest.mark.anyio
async def test_a_deadline_passing_during_a_batch_from_the_loop_is_a_504_and_stops_the_child(
        model_dirs: ModelDirs) -> None:
    """The request's deadline cancels its row in the child (copied there every CANCEL_POLL_S), so the variant
    is free again long before the 120 slowed steps the row asked for (30 ms each) would have ended: a sampled
    request on the per-step path, and a plain greedy one, whose batch ends once all its rows are cancelled."""
    settings = make_settings(model_dirs, baseline_path=None, load_baseline=False, model_process=True,
                             device="cpu", dtype="fp32", serve_lone_here=False)
    async with running_app(settings, loader=slow_loader) as (app, client):
        batcher = app.state.service.registry.get("eas").batcher
        plain = {"image": _url(image_bytes()).split(",", 1)[1], "question": QUESTION, "max_new_tokens": 120}
        for k, body in enumerate((plain, {**plain, "temperature": 0.7, "seed": 3}), start=1):
            response = await client.post("/v1/answer", json=body, headers={"X-Request-Deadline-Ms": "300"})
            assert response.status_code == 504, response.text
            assert batcher.sent_from_loop == 2 * k - 1
            freed = time.monotonic() + 2.0  # the whole row would take 3.6 s more
            while batcher.busy and time.monotonic() < freed:
                await asyncio.sleep(0.01)
            assert not batcher.busy
            response = await client.post("/v1/answer", json={**body, "max_new_tokens": 2})
            assert response.status_code == 200 and batcher.sent_from_loop == 2 * k


def test_a_plain_batch_ends_once_every_row_is_cancelled_and_not_before(direct: LoadedModel) -> None:
    """In the runner itself (the model process's, or the server's own thread without one): a greedy batch
    runs unmodified while any row is still wanted, and stops at the next step once none is."""
    from service.runner.runner import ModelRunner

    info = VariantInfo(variant="eas", model="tiny", version="v1", kind="local", path=Path("."))
    runner = ModelRunner(direct, info, ThreadBudget(threads=1))
    features = direct.prepare_one(Image.open(io.BytesIO(image_bytes())), QUESTION)
    steps: list[int] = []
    rows: list[_Item] = []

    def count(module: Any, args: Any, output: Any) -> None:
        steps.append(1)
        if len(steps) == 3:
            for row in rows:
                row.cancelled.set()

    handle = direct.model.register_forward_hook(count)
    try:
        wanted = _Item(features, 12)
        rows[:] = [_Item(features, 12)]  # only one of the two rows is cancelled
        full = runner.run_batch([rows[0], wanted])
        assert len(steps) == 12 and full[1].completion_tokens == 12
        steps.clear()
        rows[:] = [_Item(features, 12), _Item(features, 12)]  # both
        runner.run_batch(rows)
        assert len(steps) == 3  # the criterion, checked after each step's token, ends it right there
    finally:
        handle.remove()


def test_a_cancel_flag_reaches_the_childs_row_at_once_and_a_late_hook_leaves_the_next_batch_alone(
        slow_runner: ProcessRunner) -> None:
    """WorkItem's CancelFlag sets its row's flag when it is set (no polling); a hook from an earlier batch that
    fires after the next batch began does not touch the new batch's rows."""
    from service.batching.work import CancelFlag

    runner = slow_runner
    first, second = _Item(None, 2), _Item(None, 2)
    first.cancelled, second.cancelled = CancelFlag(), CancelFlag()
    runner._batch_message([first, second])
    watched, pushed = runner._watch([first, second])
    assert pushed and not runner._flags[1]
    second.cancelled.set()
    assert runner._flags[1] and not runner._flags[0]
    stale = watched[0][1]  # first's hook, as a cancellation racing the end of its batch would still hold it
    runner._unwatch(watched)
    first.cancelled.set()
    assert not runner._flags[0]  # unwatched: nothing
    runner._batch_message([_Item(None, 2)])  # the next batch
    stale()
    assert not runner._flags[0]
    late = _Item(None, 2)
    late.cancelled = CancelFlag()
    late.cancelled.set()  # cancelled before its batch started: set the moment it is watched
    runner._batch_message([late])
    assert runner._watch([late])[1] and runner._flags[0]
    assert not runner._watch([_Item(None, 2)])[1]  # a plain Event: copied by polling instead
    runner._batch_message([])  # leave the flags as a finished batch would


# --- an idle server's lone request in this process (Settings.serve_lone_here) --------------------------------

@pytest.mark.anyio
async def test_a_lone_request_runs_here_on_the_shared_weights_and_arrivals_go_to_the_child(
        model_dirs: ModelDirs, direct: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """One copy of the weights, mapped by both processes. The request that finds the server idle runs in this
    process; one that arrives while it runs goes to the child at once and is answered first; two more go to the
    child too. Every answer equals the model's own."""
    settings = make_settings(model_dirs, baseline_path=None, load_baseline=False, model_process=True,
                             device="cpu", dtype="fp32", max_batch_wait_ms=50, serve_lone_here=True)
    async with running_app(settings, loader=slow_loader) as (app, client):
        runner, batcher = _runner(app), app.state.service.registry.get("eas").batcher
        assert runner.serves_here and runner.shared_bytes > 0
        assert all(p.device.type == "cpu" for p in runner.model.model.parameters())
        with open(f"/proc/{runner.pid}/maps") as maps:
            assert "memfd:eas-weights" in maps.read()  # the child computes on the parent's copy
        sent: list[int] = []
        message = runner._batch_message
        monkeypatch.setattr(runner, "_batch_message", lambda items: (sent.append(len(items)), message(items))[1])
        packed: list[int] = []  # features serialised for the child where they were prepared
        runner_pack = runner.pack
        monkeypatch.setattr(runner, "pack", lambda features: (packed.append(1), runner_pack(features))[1])
        run_here = batcher._run_here
        here_packed: list[bool] = []
        monkeypatch.setattr(batcher, "_run_here", lambda items: (
            here_packed.extend(isinstance(i.features, Packed) for i in items), run_here(items))[1])
        cases = [(image_bytes((200, 30, 30)), 40), (image_bytes((30, 160, 30), (64, 48), shape="rectangle"), 2),
                 (image_bytes((30, 30, 200), (40, 56)), 2), (image_bytes((120, 60, 20)), 2)]

        def post(png: bytes, tokens: int) -> Any:
            return client.post("/v1/answer", json={"image": _url(png).split(",", 1)[1], "question": QUESTION,
                                                   "max_new_tokens": tokens})

        lone = asyncio.ensure_future(post(*cases[0]))  # ~40 slowed steps (30 ms each) in this process
        await wait_until(lambda: batcher.ran_here == 1)
        arrival = await post(*cases[1])
        assert not lone.done() and sent == [1]  # it went to the child and came back while the lone one ran
        together = await asyncio.gather(*(post(*case) for case in cases[2:]))
        responses = [await lone, arrival, *together]
    assert batcher.ran_here == 1 and sent[0] == 1 and sum(sent) == 3
    assert here_packed == [False] and len(packed) == 3  # only what went to the child was packed
    for (png, tokens), response in zip(cases, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == direct.answer([Image.open(io.BytesIO(png))], [QUESTION], tokens)[0]
