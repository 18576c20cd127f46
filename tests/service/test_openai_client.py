"""The official `openai` client against the app on a loopback uvicorn (issue 18): sampling options are
honoured (seeded sampling reproducible, temperature 0 is greedy, stop cuts the answer), unsupported
parameters are refused by name, streaming sends tokens as they exist, and `models.retrieve` works."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from eas.model.loading import LoadedModel, load_model
from service.app import create_app
from service.runner.runner import VariantInfo
from service.settings import Settings
from service.validation.sampling import SEED_BOUND
from tests.service.conftest import TEST_DEVICE, TEST_DTYPE, Gate, ModelDirs, image_bytes, make_settings, uvicorn_thread

QUESTION = "what colour is the circle?"
STEP_S = 0.04  # the slowed model's extra time per forward pass (one per generated token)


def _messages(png: bytes) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def png() -> bytes:
    return image_bytes()


@pytest.fixture(scope="module")
def greedy(model_dirs: ModelDirs, png: bytes) -> str:
    model = load_model(model_dirs.eas, device=TEST_DEVICE, dtype=TEST_DTYPE)
    return model.answer([Image.open(io.BytesIO(png))], [QUESTION], 12)[0]


@pytest.fixture(scope="module")
def client(model_dirs: ModelDirs) -> Iterator[openai.OpenAI]:
    app = create_app(make_settings(model_dirs))
    with uvicorn_thread(app) as (base_url, _server):
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def _ask(client: openai.OpenAI, png: bytes, **params: Any) -> Any:
    return client.chat.completions.create(model="eas", messages=_messages(png), max_tokens=12, **params)


def test_temperature_zero_is_greedy(client: openai.OpenAI, png: bytes, greedy: str) -> None:
    assert len(greedy.split()) > 1 or len(greedy) > 3  # a multi-token answer, so the checks below bite
    assert _ask(client, png, temperature=0).choices[0].message.content == greedy
    # top_p and seed change nothing at temperature 0; the stop-token path (per-step control) agrees too
    assert _ask(client, png, temperature=0, top_p=0.3, seed=5).choices[0].message.content == greedy
    assert _ask(client, png, extra_body={"stop_token_ids": [31999]}).choices[0].message.content == greedy


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, png: bytes, greedy: str) -> None:
    first = _ask(client, png, temperature=1.5, seed=1234).choices[0].message.content
    again = _ask(client, png, temperature=1.5, seed=1234).choices[0].message.content
    other = _ask(client, png, temperature=1.5, seed=4321).choices[0].message.content
    assert first == again
    assert first != greedy and other != first  # negative controls: sampling really samples, the seed matters


def test_stop_cuts_the_answer(client: openai.OpenAI, png: bytes, greedy: str) -> None:
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    assert stop.strip() and stop in greedy
    completion = _ask(client, png, stop=[stop])
    assert completion.choices[0].message.content == greedy[: greedy.find(stop)].strip()
    assert completion.choices[0].finish_reason == "stop"
    full = _ask(client, png)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    assert completion.usage.completion_tokens < full.usage.completion_tokens  # generation stopped there
    streamed = _ask(client, png, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        completion.choices[0].message.content)


@pytest.mark.parametrize(("params", "named"), [
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"n": 2}, "n"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),  # not an OpenAI parameter at all
    ({"extra_body": {"stream": 1}}, "stream"),  # strict types: 1 is not a boolean
    ({"extra_body": {"max_tokens": True}}, "max_tokens"),  # ... and a boolean is not an integer
    ({"temperature": 2.5}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_unsupported_parameters_are_refused_by_name(client: openai.OpenAI, png: bytes, params: dict,
                                                    named: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _ask(client, png, **params)
    error = refused.value.body
    assert error["param"] == named and named in error["message"], error


def test_neutral_values_of_unsupported_parameters_pass(client: openai.OpenAI, png: bytes, greedy: str) -> None:
    completion = _ask(client, png, logprobs=False, presence_penalty=0, frequency_penalty=0.0, user="u-1",
                      response_format={"type": "text"}, n=1, tools=[])
    assert completion.choices[0].message.content == greedy


def test_models_retrieve(client: openai.OpenAI) -> None:
    assert client.models.retrieve("eas").id == "eas"
    assert client.models.retrieve("tiny-llava:baseline").id == "baseline"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_answer_route_takes_the_same_options(client: openai.OpenAI, png: bytes, greedy: str) -> None:
    base_url = str(client.base_url).removesuffix("/v1/")
    body = {"image": base64.b64encode(png).decode(), "question": QUESTION, "max_new_tokens": 12}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        def answer(**extra: Any) -> str:
            response = http.post("/v1/answer", json={**body, **extra})
            assert response.status_code == 200, response.text
            return response.json()["answer"]

        assert answer(temperature=0) == greedy
        assert answer(temperature=1.5, seed=9) == answer(temperature=1.5, seed=9) != greedy
        stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
        assert answer(stop=stop) == greedy[: greedy.find(stop)].strip()
        form = http.post("/v1/answer", files={"image": ("i.png", png, "image/png")},
                         data={"question": QUESTION, "max_new_tokens": "12", "stop": [stop]})
        assert form.status_code == 200 and form.json()["answer"] == answer(stop=stop)
        refused = http.post("/v1/answer", json={**body, "seed": "7"})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [-SEED_BOUND - 1, SEED_BOUND + 1, 2**70])
def test_a_seed_torch_cannot_take_is_a_422_on_every_route(client: openai.OpenAI, png: bytes, seed: int) -> None:
    """The seed's range is checked with the request (2**70 was a 500 from inside the batch)."""
    base_url = str(client.base_url).removesuffix("/v1/")
    answer = {"image": base64.b64encode(png).decode(), "question": QUESTION, "temperature": 1}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        refusals = [
            http.post("/v1/answer", json={**answer, "seed": seed}),
            http.post("/v1/answer", files={"image": ("i.png", png, "image/png")},
                      data={"question": QUESTION, "temperature": "1", "seed": str(seed)}),
            http.post("/v1/chat/completions", json={"model": "eas", "messages": _messages(png), "temperature": 1,
                                                    "seed": seed}),
        ]
        for refused in refusals:
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["param"] == "seed"
        for edge in (-SEED_BOUND, SEED_BOUND):  # the ends of the range are served
            assert http.post("/v1/answer", json={**answer, "seed": edge}).status_code == 200


class SlowModel:
    """Every forward pass of the language model (one per generated token) sleeps STEP_S first, and counts."""

    def __init__(self) -> None:
        self.forwards = 0
        self.gate = Gate()

    def loader(self):
        gated = self.gate.loader()

        def load(info: VariantInfo, settings: Settings) -> LoadedModel:
            model = gated(info, settings)

            def slow(module: Any, args: Any) -> None:
                self.forwards += 1
                time.sleep(STEP_S)

            model.model.register_forward_pre_hook(slow)
            return model

        return load


@pytest.fixture(scope="module")
def slow(model_dirs: ModelDirs) -> Iterator[tuple[str, SlowModel, Any]]:
    slowed = SlowModel()
    app = create_app(make_settings(model_dirs), loader=slowed.loader())
    with uvicorn_thread(app) as (base_url, _server):
        yield base_url, slowed, app


def test_stream_sends_tokens_as_they_exist(slow, png: bytes, greedy: str) -> None:
    base_url, _slowed, _app = slow
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    arrivals, parts = [], []
    stream = client.chat.completions.create(model="eas", messages=_messages(png), max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == greedy
    assert len(parts) > 1
    # Each token costs at least STEP_S, so a first chunk sent before generation ended arrives at least
    # (chunks - 1) steps before the last one; a stream sent at the end would show a gap near zero.
    assert arrivals[-1] - arrivals[0] >= 0.5 * (len(parts) - 1) * STEP_S
    assert usage is not None and usage.completion_tokens >= len(parts)


def test_disconnect_stops_the_work_and_streams_share_batches(slow, png: bytes, greedy: str) -> None:
    base_url, slowed, app = slow
    batcher = app.state.service.registry.get("eas").batcher
    payload = {"model": "eas", "messages": _messages(png), "max_tokens": 24, "stream": True}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        before = slowed.forwards
        with http.stream("POST", "/v1/chat/completions", json=payload) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if '"content": "' in line and '""' not in line)
        deadline = time.monotonic() + 20
        while batcher.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        # 24 tokens would take 24 forward passes; the row is dropped within a few steps of the hang-up.
        assert slowed.forwards - before < 24

        # A plain request holds the worker; a streamed and a plain one queue behind it and run together.
        slowed.gate.close()
        blocker = threading.Thread(target=http.post, args=("/v1/chat/completions",),
                                   kwargs={"json": {**payload, "stream": False, "max_tokens": 2}})
        blocker.start()
        assert slowed.gate.started.wait(10)
        results: dict[str, Any] = {}

        def streamed() -> None:
            with http.stream("POST", "/v1/chat/completions", json={**payload, "max_tokens": 12}) as r:
                results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        def plain() -> None:
            results["plain"] = http.post("/v1/chat/completions",
                                         json={**payload, "stream": False, "max_tokens": 12, "stop": ["zz"]})

        threads = [threading.Thread(target=streamed), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while batcher.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        slowed.gate.open()
        for t in [blocker, *threads]:
            t.join(30)
    sizes = app.state.metrics.batch_size.labels("tiny-llava", "eas")
    assert results["plain"].json()["choices"][0]["message"]["content"] == greedy
    assert any('"finish_reason": "length"' in line for line in results["stream"])
    buckets = {s.labels["le"]: s.value for s in sizes.collect()[0].samples if s.name.endswith("_bucket")}
    assert buckets["2.0"] - buckets["1.0"] >= 1  # the streamed and the plain request shared one batch
