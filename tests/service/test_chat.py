"""`POST /v1/chat/completions` (in process) and the official `openai` client against a real uvicorn."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from PIL import Image

from eas.model.loading import LoadedModel, load_model
from tests.service.conftest import (
    TEST_DEVICE,
    TEST_DTYPE,
    ModelDirs,
    image_bytes,
    make_settings,
    running_app,
    uvicorn_thread,
)

QUESTION = "what colour is the circle?"
TOKEN = "chat-test-token"


def _messages(png: bytes, question: str = QUESTION) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "system", "content": "You answer questions about images."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def direct(model_dirs: ModelDirs) -> dict[str, LoadedModel]:
    return {v: load_model(getattr(model_dirs, v), device=TEST_DEVICE, dtype=TEST_DTYPE) for v in ("eas", "baseline")}


def _expected(direct: dict[str, LoadedModel], variant: str, png: bytes, max_new_tokens: int = 8) -> str:
    return direct[variant].answer([Image.open(io.BytesIO(png))], [QUESTION], max_new_tokens)[0]


@pytest.fixture(scope="module")
async def served(model_dirs: ModelDirs):
    async with running_app(make_settings(model_dirs)) as pair:
        yield pair


@pytest.mark.anyio
async def test_chat_completion_shape_and_usage(served, direct) -> None:
    _, client = served
    png = image_bytes()
    response = await client.post("/v1/chat/completions",
                                 json={"model": "eas", "messages": _messages(png), "max_tokens": 4,
                                       "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "eas"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": _expected(direct, "eas", png, 4)}
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.headers["x-model-variant"] == "eas"
    assert body["id"] == f"chatcmpl-{response.headers['x-request-id']}"


@pytest.mark.anyio
@pytest.mark.parametrize(("model", "variant"), [("baseline", "baseline"), ("tiny-llava", "eas"),
                                                ("tiny-llava:baseline", "baseline"), (None, "eas")])
async def test_model_field_selects_variant(served, direct, model, variant) -> None:
    _, client = served
    png = image_bytes()
    payload = {"messages": _messages(png)}
    if model is not None:
        payload["model"] = model
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    assert response.headers["x-model-variant"] == variant
    assert response.json()["choices"][0]["message"]["content"] == _expected(direct, variant, png)


@pytest.mark.anyio
async def test_streaming_sse(served, direct) -> None:
    _, client = served
    png = image_bytes()
    response = await client.post("/v1/chat/completions", json={
        "model": "baseline", "messages": _messages(png), "stream": True,
        "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == _expected(direct, "baseline", png)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


@pytest.mark.anyio
@pytest.mark.parametrize(("mutate", "status", "code"), [
    (lambda p: p.update(model="nope"), 404, "model_not_found"),
    (lambda p: p["messages"][1]["content"][0]["image_url"].update(url="https://example.com/cat.png"), 400,
     "image_url_fetch_disabled"),
    (lambda p: p["messages"][1]["content"].pop(0), 422, "validation_error"),
    (lambda p: p["messages"][1]["content"].append(dict(p["messages"][1]["content"][0])), 422,
     "validation_error"),
    (lambda p: p["messages"][1]["content"].append({"type": "input_audio", "input_audio": {}}), 422,
     "validation_error"),
    (lambda p: p.update(n=2), 422, "unsupported_parameter"),
    (lambda p: p.update(max_tokens=100_000), 422, "validation_error"),
    (lambda p: p.update(messages=[]), 422, "validation_error"),
    (lambda p: p["messages"][1]["content"][1].update(text="   "), 422, "validation_error"),
    (lambda p: p["messages"][1]["content"][1].update(text="and <image>?"), 422, "reserved_marker"),
    (lambda p: p["messages"][1]["content"][0]["image_url"].update(detail="ultra"), 422, "validation_error"),
    (lambda p: p["messages"][1]["content"][0]["image_url"].update(url="data:image/png;base64,@@@"), 400,
     "bad_request"),
])
async def test_chat_errors(served, mutate, status, code) -> None:
    _, client = served
    payload = {"model": "eas", "messages": _messages(image_bytes())}
    mutate(payload)
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["request_id"]


@pytest.mark.anyio
async def test_an_image_without_a_question_says_so(served) -> None:
    _, client = served
    payload = {"model": "eas", "messages": _messages(image_bytes(), question="")}
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "messages" and "question" in error["message"], error


@pytest.mark.anyio
async def test_chat_malformed_body_and_content_type(served) -> None:
    _, client = served
    bad_json = await client.post("/v1/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "bad_request"
    form = await client.post("/v1/chat/completions", data={"model": "eas"})
    assert form.status_code == 415


def test_openai_client_round_trip(model_dirs: ModelDirs, direct) -> None:
    """The official client, unchanged, against the app served by uvicorn on 127.0.0.1 (with auth)."""
    from service.app import create_app

    app = create_app(make_settings(model_dirs, api_token=TOKEN))
    png = image_bytes()
    with uvicorn_thread(app) as (base_url, _server):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=TOKEN, max_retries=0, timeout=30)
        completion = client.chat.completions.create(model="eas", messages=_messages(png), max_tokens=4)
        assert completion.choices[0].message.content == _expected(direct, "eas", png, 4)
        assert completion.usage is not None and completion.usage.completion_tokens <= 4
        assert {m.id for m in client.models.list()} == {"eas", "baseline"}

        stream = client.chat.completions.create(model="baseline", messages=_messages(png), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == _expected(
            direct, "baseline", png)

        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="gpt-4o", messages=_messages(png))
        assert "does not exist" in str(not_found.value)
        with pytest.raises(openai.BadRequestError):
            bad = _messages(png)
            bad[1]["content"][0]["image_url"]["url"] = "http://127.0.0.1:1/cat.png"
            client.chat.completions.create(model="eas", messages=bad)
        wrong_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            wrong_key.models.list()
