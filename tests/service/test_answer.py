"""`POST /v1/answer`: both content types, both variants, response shape and headers, equality with the
direct in-process model call."""

from __future__ import annotations

import base64

import pytest

from eas.model.loading import LoadedModel, load_model
from tests.service.conftest import (
    TEST_DEVICE,
    TEST_DTYPE,
    ModelDirs,
    image_bytes,
    make_settings,
    multipart,
    running_app,
)

pytestmark = pytest.mark.anyio

QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
async def served(model_dirs: ModelDirs):
    async with running_app(make_settings(model_dirs)) as pair:
        yield pair


@pytest.fixture(scope="module")
def direct(model_dirs: ModelDirs) -> dict[str, LoadedModel]:
    return {v: load_model(getattr(model_dirs, v), device=TEST_DEVICE, dtype=TEST_DTYPE) for v in ("eas", "baseline")}


def _pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


async def test_multipart_default_variant(served, direct) -> None:
    _, client = served
    png = image_bytes()
    response = await client.post("/v1/answer", **multipart(png, QUESTION))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"answer", "model", "version", "variant", "request_id", "timings"}
    assert (body["model"], body["version"], body["variant"]) == ("tiny-llava", "local", "eas")
    assert body["answer"] == direct["eas"].answer([_pil(png)], [QUESTION])[0]
    timings = body["timings"]
    assert set(timings) == {"queue_s", "preprocess_s", "inference_s", "total_s"}
    assert all(v >= 0 for v in timings.values())
    assert timings["total_s"] >= timings["inference_s"]
    assert response.headers["x-model-variant"] == "eas"
    assert response.headers["x-request-id"] == body["request_id"]
    server_timing = response.headers["server-timing"]
    for name in ("queue", "preprocess", "inference", "total"):
        assert f"{name};dur=" in server_timing


async def test_json_data_url_baseline(served, direct) -> None:
    _, client = served
    png = image_bytes((30, 30, 200), shape="rect")
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    response = await client.post("/v1/answer", json={"image": data_url, "question": QUESTION,
                                                     "variant": "baseline", "max_new_tokens": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["variant"] == "baseline"
    assert response.headers["x-model-variant"] == "baseline"
    assert body["answer"] == direct["baseline"].answer([_pil(png)], [QUESTION], max_new_tokens=3)[0]


async def test_variants_really_differ(served, direct) -> None:
    """Routing is observable: the two (differently seeded) models answer differently here."""
    _, client = served
    png = image_bytes()
    expected = {v: direct[v].answer([_pil(png)], [QUESTION])[0] for v in ("eas", "baseline")}
    assert expected["eas"] != expected["baseline"]
    for variant in ("eas", "baseline"):
        response = await client.post("/v1/answer", **multipart(png, QUESTION, variant=variant))
        assert response.json()["answer"] == expected[variant]


async def test_json_bare_base64_and_image_url_alias(served) -> None:
    _, client = served
    jpeg = image_bytes(fmt="JPEG")
    b64 = base64.b64encode(jpeg).decode()
    first = await client.post("/v1/answer", json={"image": b64, "question": QUESTION})
    second = await client.post("/v1/answer", json={"image_url": {"url": f"data:image/jpeg;base64,{b64}"},
                                                   "question": QUESTION})
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["answer"] == second.json()["answer"]


async def test_auto_variant_and_max_new_tokens(served, direct) -> None:
    _, client = served
    png = image_bytes()
    response = await client.post("/v1/answer", **multipart(png, QUESTION, variant="auto", max_new_tokens="2"))
    assert response.status_code == 200
    assert response.json()["variant"] == "eas"
    assert response.json()["answer"] == direct["eas"].answer([_pil(png)], [QUESTION], max_new_tokens=2)[0]


async def test_request_id_echoed_or_generated(served) -> None:
    _, client = served
    png = image_bytes()
    echoed = await client.post("/v1/answer", headers={"X-Request-Id": "client-abc.123"},
                               **multipart(png, QUESTION))
    assert echoed.headers["x-request-id"] == "client-abc.123" == echoed.json()["request_id"]
    unsafe = await client.post("/v1/answer", headers={"X-Request-Id": "bad id\twith spaces"},
                               **multipart(png, QUESTION))
    generated = unsafe.headers["x-request-id"]
    assert generated != "bad id\twith spaces" and len(generated) == 32


async def test_models_and_info(served) -> None:
    _, client = served
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"eas", "baseline"}
    assert by_id["eas"]["default"] is True and by_id["baseline"]["default"] is False
    assert by_id["eas"]["root"] == "tiny-llava"
    info = (await client.get("/info")).json()
    assert info["phase"] == "ready"
    assert {v["variant"] for v in info["variants"]} == {"eas", "baseline"}
    assert info["limits"]["url_fetch"] is False
    assert info["batching"]["max_batch_size"] == 16


async def test_large_image_decoded_off_the_loop(served, direct) -> None:
    _, client = served
    jpeg = image_bytes(size=(900, 700), fmt="JPEG")  # > 512x512 pixels: decoded in a worker thread
    response = await client.post("/v1/answer", files={"image": ("big.jpg", jpeg, "image/jpeg")},
                                 data={"question": QUESTION})
    assert response.status_code == 200, response.text
    assert response.json()["answer"] == direct["eas"].answer([_pil(jpeg)], [QUESTION])[0]


@pytest.mark.parametrize("question", ["what is <image> here?", "<image>", "two <image><image> markers"])
async def test_a_question_holding_the_image_placeholder_is_refused(served, question: str) -> None:
    """The processor counts `<image>` in the text against the images given: a question holding one was a
    500 (ValueError in the processor). Now a 422 naming the marker, over both content types."""
    _, client = served
    b64 = base64.b64encode(image_bytes()).decode()
    for response in (await client.post("/v1/answer", json={"image": b64, "question": question}),
                     await client.post("/v1/answer", **multipart(image_bytes(), question))):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "reserved_marker" and error["param"] == "question"
        assert "'<image>'" in error["message"] and "image token" in error["message"]
    fine = await client.post("/v1/answer", json={"image": b64, "question": "what is the image < here >?"})
    assert fine.status_code == 200, fine.text
