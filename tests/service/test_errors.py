"""Every refusal path of the inference routes, and the one error shape everywhere (no stack traces)."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image

from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q = "what colour is the circle?"
LIMITS = {"api_token": TOKEN, "max_body_bytes": 64 * 1024, "max_image_pixels": 256 * 256,
          "max_image_side": 512, "max_question_chars": 50, "max_new_tokens": 16}


@pytest.fixture(scope="module")
async def served(model_dirs: ModelDirs):
    async with running_app(make_settings(model_dirs, **LIMITS)) as (app, client):
        client.headers.update(AUTH)
        yield app, client


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "type", "param", "request_id"}
    assert error["message"] and error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


# --- 401 ---------------------------------------------------------------------------------------------

async def test_auth_required_on_inference_routes(served) -> None:
    _, client = served
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN.upper()}"}):
        response = await client.post("/v1/answer", headers=headers, **multipart(image_bytes(), Q))
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/metrics", "/info"):
        assert_error(await client.get(path, headers={"Authorization": ""}), 401)
    ok = await client.post("/v1/answer", headers={"Authorization": f"bearer {TOKEN}"},
                           **multipart(image_bytes(), Q))
    assert ok.status_code == 200  # the scheme word is case-insensitive, the token is not
    assert (await client.get("/health/live", headers={"Authorization": ""})).status_code == 200
    assert (await client.get("/health/ready", headers={"Authorization": ""})).status_code == 200


async def test_auth_checked_before_size(served) -> None:
    _, client = served
    response = await client.post("/v1/answer", headers={"Authorization": ""}, content=b"x" * 100_000)
    assert_error(response, 401)


# --- 413 ---------------------------------------------------------------------------------------------

async def test_declared_body_too_large(served) -> None:
    _, client = served
    response = await client.post("/v1/answer", **multipart(b"\x89PNG" + b"\0" * 70_000, Q))
    error = assert_error(response, 413, "payload_too_large")
    assert "65536" in error["message"]


async def test_streamed_body_too_large_without_content_length(served) -> None:
    _, client = served

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"{" + b" " * 4095

    request = client.build_request("POST", "/v1/answer", content=chunks(),
                                   headers={"content-type": "application/json"})
    assert "content-length" not in request.headers
    assert_error(await client.send(request), 413, "payload_too_large")


async def test_decompression_bomb_refused_from_header(served) -> None:
    _, client = served
    bomb = _png((4000, 4000))  # 16 Mpx in a few KB: refused on its header, never decompressed
    assert len(bomb) < 64 * 1024
    error = assert_error(await client.post("/v1/answer", **multipart(bomb, Q)), 413, "image_too_large")
    assert "4000x4000" in error["message"]
    wide = _png((600, 8))  # few pixels, but a side over max_image_side
    assert_error(await client.post("/v1/answer", **multipart(wide, Q)), 413, "image_too_large")


# --- 415 / 400 ---------------------------------------------------------------------------------------

async def test_unsupported_request_content_type(served) -> None:
    _, client = served
    response = await client.post("/v1/answer", content=b"question=hi", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type")


async def test_disallowed_image_format(served) -> None:
    _, client = served
    error = assert_error(await client.post("/v1/answer", **multipart(image_bytes(fmt="GIF"), Q)), 415,
                         "unsupported_image_format")
    assert "GIF" in error["message"] and "PNG" in error["message"]


@pytest.mark.parametrize(("payload", "needle"), [
    (b"definitely not an image", "not a recognised image"),
    (b"", "empty"),
    (image_bytes(size=(200, 200))[:300], "truncated"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot read"),
])
async def test_not_an_image(served, payload: bytes, needle: str) -> None:
    _, client = served
    error = assert_error(await client.post("/v1/answer", **multipart(payload, Q)), 400, "invalid_image")
    assert needle in error["message"]


async def test_json_parse_errors(served) -> None:
    _, client = served
    post = client.post
    assert_error(await post("/v1/answer", content=b"{oops", headers={"content-type": "application/json"}),
                 400, "bad_request")
    assert_error(await post("/v1/answer", json={"image": "!!!notbase64", "question": Q}), 400, "bad_request")
    remote = await post("/v1/answer", json={"image_url": "https://example.com/x.png", "question": Q})
    assert_error(remote, 400, "image_url_fetch_disabled")
    text_data_url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    assert_error(await post("/v1/answer", json={"image": text_data_url, "question": Q}), 415)


# --- 422 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("question", "fields", "param"), [
    ("   ", {}, "question"),
    ("x" * 51, {}, "question"),
    (Q, {"max_new_tokens": "abc"}, "max_new_tokens"),
    (Q, {"max_new_tokens": "0"}, "max_new_tokens"),
    (Q, {"max_new_tokens": "17"}, "max_new_tokens"),
])
async def test_multipart_semantic_errors(served, question: str, fields: dict, param: str) -> None:
    _, client = served
    error = assert_error(await client.post("/v1/answer", **multipart(image_bytes(), question, **fields)), 422,
                         "validation_error")
    assert error["param"] == param


async def test_missing_fields(served) -> None:
    _, client = served
    png = image_bytes()
    no_question = await client.post("/v1/answer", files={"image": ("a.png", png, "image/png")})
    assert assert_error(no_question, 422)["param"] == "question"
    no_image = await client.post("/v1/answer", files={"question": (None, Q)})
    assert assert_error(no_image, 422)["param"] == "image"
    image_as_text = await client.post("/v1/answer", files={"image": (None, "abc"), "question": (None, Q)})
    assert assert_error(image_as_text, 422)["param"] == "image"
    json_missing = await client.post("/v1/answer", json={"image": base64.b64encode(png).decode()})
    assert assert_error(json_missing, 422)["param"] == "question"
    # An unknown field is refused by name, checked before the (valid) image is decoded.
    json_extra = await client.post("/v1/answer", json={"image": base64.b64encode(png).decode(), "question": Q,
                                                       "frequency_penalty": 1})
    assert "frequency_penalty" in assert_error(json_extra, 422)["message"]


async def test_bad_deadline_header(served) -> None:
    _, client = served
    for value in ("soon", "-5", "0"):
        response = await client.post("/v1/answer", headers={"X-Request-Deadline-Ms": value},
                                     **multipart(image_bytes(), Q))
        assert_error(response, 422, "validation_error")


# --- 404 / 405 / FastAPI's own errors / 500 ----------------------------------------------------------

async def test_unknown_variant_route_and_method(served) -> None:
    _, client = served
    error = assert_error(await client.post("/v1/answer", **multipart(image_bytes(), Q, variant="turbo")), 404,
                         "variant_not_found")
    assert "eas" in error["message"] and "baseline" in error["message"]
    assert_error(await client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await client.get("/v1/answer"), 405, "method_not_allowed")


async def test_framework_validation_error_uses_the_shape(served) -> None:
    app, client = served

    async def typed(limit: int) -> dict:
        return {"limit": limit}

    app.add_api_route("/test/typed", typed)
    error = assert_error(await client.get("/test/typed", params={"limit": "many"}), 422, "validation_error")
    assert error["param"] == "limit"


async def test_unexpected_exception_is_500_without_trace(served) -> None:
    app, _ = served

    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/test/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/test/boom", headers={"X-Request-Id": "req-500"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["request_id"] == "req-500"
    assert "secret internal detail" not in response.text and "Traceback" not in response.text


async def test_rejections_are_counted(served) -> None:
    _, client = served
    await client.post("/v1/answer", **multipart(b"nope", Q))
    text = (await client.get("/metrics")).text
    assert 'eas_requests_rejected_total{reason="invalid_image"}' in text
