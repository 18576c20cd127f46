"""Hand-made hostile inputs against a real server on 127.0.0.1: broken and oversized images, wrong content
types, enormous and binary questions, malformed JSON and multipart, garbage data URLs, on both inference
routes. Each must get a clear 4xx in the service's error shape naming the problem, never a 5xx; then the
whole barrage again, concurrently and mixed with normal requests (which must still get 200s, also when a
hostile request shares their batch), after which the server reports no 5xx and still answers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import random
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.hardening.conftest import LiveServer, assert_error, metric_values, start_server
from tests.service.conftest import image_bytes

Q = "what colour is the shape?"
GOOD_PNG = image_bytes()
GOOD_B64 = base64.b64encode(GOOD_PNG).decode()
GOOD_DATA_URL = f"data:image/png;base64,{GOOD_B64}"


# --- image builders ------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` RGB pixels, with (almost) no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real baseline JPEG whose start-of-frame header is patched to claim `width`x`height`."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_png() -> bytes:
    """A PNG with its compressed pixel stream overwritten (chunk CRCs are not what Pillow trips on)."""
    data = bytearray(image_bytes(size=(64, 64)))
    idat = data.index(b"IDAT")
    data[idat + 6: idat + 40] = b"\x55" * 34
    return bytes(data)


# --- request builders ----------------------------------------------------------------------------------

Send = Callable[[httpx.Client], httpx.Response]


def answer_multipart(image: bytes = GOOD_PNG, question: str | None = Q, **fields: str) -> Send:
    data = dict(fields) if question is None else {"question": question, **fields}
    return lambda c: c.post("/v1/answer", files={"image": ("image.png", image, "image/png")}, data=data)


def answer_json(payload: Any) -> Send:
    return lambda c: c.post("/v1/answer", content=json.dumps(payload), headers={"content-type": "application/json"})


def raw(path: str, content: bytes, content_type: str | None, **headers: str) -> Send:
    all_headers = dict(headers)
    if content_type is not None:
        all_headers["content-type"] = content_type
    return lambda c: c.post(path, content=content, headers=all_headers)


def multipart_body(boundary: str, parts: list[tuple[str, bytes]]) -> bytes:
    """Hand-built multipart/form-data: (Content-Disposition parameters, content) per part."""
    out = b""
    for disposition, content in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


GOOD_MULTIPART = multipart_body("b0undary", [('name="image"; filename="a.png"', GOOD_PNG),
                                             ('name="question"', Q.encode())])


def chat(content: Any, **extra: Any) -> Send:
    payload = {"model": "eas", "messages": [{"role": "user", "content": content}], **extra}
    return lambda c: c.post("/v1/chat/completions", content=json.dumps(payload),
                            headers={"content-type": "application/json"})


def chat_image(url: str, text: str = Q, **extra: Any) -> Send:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}], **extra)


@dataclass(frozen=True)
class Hostile:
    name: str
    send: Send
    status: int
    code: str
    needle: str  # a word the error message must contain: it names the problem


# Random bytes always contain control characters (C0 or, read as Latin-1, C1): binary, not a question.
BINARY = random.Random(7).randbytes(64)
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
# The server's configured pixel limit (the default 4096²): a refusal must quote it, not Pillow's own limit.
PIXEL_LIMIT = str(4096 * 4096)

CASES = [
    # images
    Hostile("png-truncated", answer_multipart(image_bytes(size=(64, 64))[:200]), 400, "invalid_image", "truncated"),
    Hostile("png-corrupt-pixels", answer_multipart(corrupt_png()), 400, "invalid_image", "corrupt"),
    Hostile("jpeg-truncated", answer_multipart(image_bytes(fmt="JPEG")[:300]), 400, "invalid_image", "JPEG"),
    Hostile("png-bomb-100000x100000", answer_multipart(png_declaring(100_000, 100_000)), 413, "image_too_large",
            PIXEL_LIMIT),
    Hostile("png-5000x5000-over-limit", answer_multipart(png_declaring(5000, 5000)), 413, "image_too_large",
            "5000x5000"),
    Hostile("png-side-1x60000", answer_multipart(png_declaring(1, 60_000)), 413, "image_too_large", "per side"),
    Hostile("jpeg-bomb-65000x65000", answer_multipart(jpeg_declaring(65_000, 65_000)), 413, "image_too_large",
            PIXEL_LIMIT),
    Hostile("png-zero-size", answer_multipart(png_declaring(0, 0)), 400, "invalid_image", "PNG"),
    Hostile("image-zero-bytes", answer_multipart(b""), 400, "invalid_image", "empty"),
    Hostile("image-is-text", answer_multipart(b"GIF? no, just text"), 400, "invalid_image", "not a recognised"),
    Hostile("image-gif-not-allowed", answer_multipart(image_bytes(fmt="GIF")), 415, "unsupported_image_format",
            "GIF"),
    Hostile("png-signature-only", answer_multipart(b"\x89PNG\r\n\x1a\n"), 400, "invalid_image", "PNG"),
    # request content types
    Hostile("ct-text-plain", raw("/v1/answer", b"question=hi", "text/plain"), 415, "unsupported_media_type",
            "text/plain"),
    Hostile("ct-missing", raw("/v1/answer", b"hello", None), 415, "unsupported_media_type", "content-type"),
    Hostile("ct-urlencoded", lambda c: c.post("/v1/answer", data={"question": Q}), 415, "unsupported_media_type",
            "x-www-form-urlencoded"),
    Hostile("ct-xml", raw("/v1/answer", b"<q/>", "application/xml"), 415, "unsupported_media_type", "xml"),
    Hostile("ct-image-png-body", raw("/v1/answer", GOOD_PNG, "image/png"), 415, "unsupported_media_type",
            "image/png"),
    Hostile("chat-ct-multipart", raw("/v1/chat/completions", GOOD_MULTIPART, "multipart/form-data; boundary=b0undary"),
            415, "unsupported_media_type", "application/json"),
    # questions
    Hostile("question-huge-json", answer_json({"image": GOOD_B64, "question": "why " * 50_000}), 422,
            "validation_error", "limit"),
    Hostile("question-huge-multipart", answer_multipart(question="why " * 50_000), 400, "bad_request", "size"),
    Hostile("question-nul-json", answer_json({"image": GOOD_B64, "question": "what\x00colour"}), 422,
            "validation_error", "U+0000"),
    Hostile("question-nul-multipart", answer_multipart(question="\x00\x00\x00"), 422, "validation_error", "U+0000"),
    Hostile("question-binary-multipart",
            raw("/v1/answer", multipart_body("b0undary", [('name="image"; filename="a.png"', GOOD_PNG),
                                                         ('name="question"', BINARY)]),
                "multipart/form-data; boundary=b0undary"), 422, "validation_error", "control character"),
    Hostile("question-lone-surrogate-json",
            raw("/v1/answer", b'{"image": "%s", "question": "what \\ud800 colour?"}' % GOOD_B64.encode(),
                "application/json"), 422, "validation_error", "surrogate"),
    Hostile("question-invalid-utf8-json",
            raw("/v1/answer", b'{"image": "%s", "question": "\xff\xfe\xfd"}' % GOOD_B64.encode(), "application/json"),
            400, "bad_request", "utf-8"),
    Hostile("question-blank", answer_multipart(question=" \t\n "), 422, "validation_error", "empty"),
    Hostile("question-missing", answer_multipart(question=None), 422, "validation_error", "question"),
    Hostile("question-as-number", answer_json({"image": GOOD_B64, "question": 42}), 422, "validation_error",
            "question"),
    # JSON bodies
    Hostile("json-malformed", raw("/v1/answer", b'{"question": "x", ', "application/json"), 400, "bad_request",
            "malformed JSON"),
    Hostile("json-empty-body", raw("/v1/answer", b"", "application/json"), 400, "bad_request", "empty"),
    # Refused from a count of its containers before json.loads runs (issue 17): no recursion at all.
    Hostile("json-nested-100000-deep", raw("/v1/answer", DEEP_JSON, "application/json"), 400, "json_too_complex",
            "values"),
    Hostile("json-not-an-object", answer_json([GOOD_B64, Q]), 422, "validation_error", "dictionary"),
    Hostile("json-unknown-field", answer_json({"image": GOOD_B64, "question": Q, "evil": True}), 422,
            "validation_error", "evil"),
    Hostile("json-5000-digit-number", raw("/v1/answer", b'{"question": "q", "max_new_tokens": ' + b"9" * 5000 + b"}",
                                          "application/json"), 400, "bad_request", "digits"),
    Hostile("json-max-new-tokens-zero", answer_json({"image": GOOD_B64, "question": Q, "max_new_tokens": 0}), 422,
            "validation_error", "max_new_tokens"),
    Hostile("chat-nested-100000-deep", raw("/v1/chat/completions", DEEP_JSON, "application/json"), 400,
            "json_too_complex", "values"),
    # multipart framing
    Hostile("multipart-no-boundary", raw("/v1/answer", GOOD_MULTIPART, "multipart/form-data"), 400, "bad_request",
            "boundary"),
    Hostile("multipart-wrong-boundary", raw("/v1/answer", GOOD_MULTIPART, "multipart/form-data; boundary=other"),
            400, "bad_request", "multipart"),
    Hostile("multipart-random-bytes", raw("/v1/answer", os.urandom(4096), "multipart/form-data; boundary=b0undary"),
            400, "bad_request", "multipart"),
    # Without its closing boundary a body is truncated (issue 17): Starlette used to drop the cut part quietly.
    Hostile("multipart-cut-in-image", raw("/v1/answer", GOOD_MULTIPART[:120], "multipart/form-data; boundary=b0undary"),
            400, "truncated_body", "truncated"),
    Hostile("multipart-part-without-name",
            raw("/v1/answer", multipart_body("b0undary", [("x=1", b"hi")]), "multipart/form-data; boundary=b0undary"),
            400, "bad_request", "name"),
    Hostile("multipart-image-missing",
            raw("/v1/answer", multipart_body("b0undary", [('name="question"', Q.encode())]),
                "multipart/form-data; boundary=b0undary"), 422, "validation_error", "'image'"),
    Hostile("multipart-image-as-text-field",
            raw("/v1/answer", multipart_body("b0undary", [('name="image"', b"iVBOR"), ('name="question"', b"q")]),
                "multipart/form-data; boundary=b0undary"), 422, "validation_error", "file upload"),
    Hostile("multipart-two-images",
            raw("/v1/answer", multipart_body("b0undary", [('name="image"; filename="a.png"', GOOD_PNG),
                                                         ('name="image"; filename="b.png"', GOOD_PNG),
                                                         ('name="question"', b"q")]),
                "multipart/form-data; boundary=b0undary"), 400, "bad_request", "files"),
    # data URLs and base64
    Hostile("b64-garbage", answer_json({"image": "!!!*&^%$", "question": Q}), 400, "bad_request", "base64"),
    Hostile("data-url-b64-garbage", answer_json({"image": "data:image/png;base64,@@@@", "question": Q}), 400,
            "bad_request", "base64"),
    Hostile("data-url-not-base64", answer_json({"image_url": "data:image/png,rawbytes", "question": Q}), 400,
            "bad_request", "base64"),
    Hostile("data-url-no-comma", answer_json({"image": "data:image/png;base64", "question": Q}), 400,
            "bad_request", "','"),
    Hostile("data-url-html", answer_json({"image": "data:text/html;base64,PGI+aGk8L2I+", "question": Q}), 415,
            "unsupported_media_type", "text/html"),
    Hostile("data-url-not-an-image", answer_json({"image": "data:image/png;base64," + base64.b64encode(b"x" * 99)
                                                  .decode(), "question": Q}), 400, "invalid_image", "not a recognised"),
    Hostile("image-url-remote", answer_json({"image_url": {"url": "http://169.254.169.254/latest"}, "question": Q}),
            400, "image_url_fetch_disabled", "not fetched"),
    Hostile("image-url-file-scheme", answer_json({"image_url": "file:///etc/passwd", "question": Q}), 400,
            "bad_request", "scheme"),
    # the OpenAI-compatible route
    Hostile("chat-b64-garbage", chat_image("data:image/png;base64,%%%%"), 400, "bad_request", "base64"),
    Hostile("chat-truncated-png", chat_image("data:image/png;base64," + base64.b64encode(GOOD_PNG[:90]).decode()),
            400, "invalid_image", "truncated"),
    Hostile("chat-png-bomb", chat_image("data:image/png;base64," + base64.b64encode(png_declaring(10**5, 10**5))
                                        .decode()), 413, "image_too_large", PIXEL_LIMIT),
    Hostile("chat-stream-bad-image", chat_image("data:image/png;base64,AAAA", stream=True), 400, "invalid_image",
            "not a recognised"),
    Hostile("chat-two-images", chat([{"type": "image_url", "image_url": {"url": GOOD_DATA_URL}}] * 2 +
                                    [{"type": "text", "text": Q}]), 422, "validation_error", "exactly one"),
    Hostile("chat-no-image", chat(Q), 422, "validation_error", "exactly one"),
    Hostile("chat-unknown-part", chat([{"type": "input_audio", "input_audio": {}}]), 422, "validation_error",
            "input_audio"),
    Hostile("chat-no-messages", lambda c: c.post("/v1/chat/completions", json={"messages": []}), 422,
            "validation_error", "messages"),
    Hostile("chat-nul-question", chat_image(GOOD_DATA_URL, "what\x00?"), 422, "validation_error", "U+0000"),
    Hostile("chat-lone-surrogate",
            raw("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": GOOD_DATA_URL}},
                {"type": "text", "text": "what \udfff?"}]}]}).encode(), "application/json"),
            422, "validation_error", "surrogate"),
    Hostile("chat-unknown-model", chat_image(GOOD_DATA_URL, model="gpt-5"), 404, "model_not_found", "gpt-5"),
    Hostile("chat-n-2", chat_image(GOOD_DATA_URL, n=2), 422, "unsupported_parameter", "n=1"),
    Hostile("chat-max-tokens-huge", chat_image(GOOD_DATA_URL, max_tokens=10**12), 422, "validation_error",
            "max_tokens"),
    # headers
    Hostile("deadline-garbage", lambda c: c.post("/v1/answer", headers={"X-Request-Deadline-Ms": "soon"},
                                                 files={"image": ("a.png", GOOD_PNG)}, data={"question": Q}),
            422, "validation_error", "X-Request-Deadline-Ms"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gets_a_clear_4xx(live: LiveServer, case: Hostile) -> None:
    with live.client() as client:
        assert_error(case.send(client), case.status, case.code, case.needle)


def test_a_hostile_request_does_not_fail_its_batch(model_dirs) -> None:
    """A question the tokenizer cannot take used to reach the worker and fail its whole batch with 500; now it
    is refused up front and the good requests batched beside it answer normally."""
    # A long batch window so that the concurrent requests below really share batches.
    with start_server(model_dirs, max_batch_wait_ms=150.0, baseline_path=None) as live:
        surrogate = CASES[[c.name for c in CASES].index("question-lone-surrogate-json")]
        with concurrent.futures.ThreadPoolExecutor(6) as pool, live.client() as client:
            good = [pool.submit(answer_multipart(), client) for _ in range(5)]
            bad = pool.submit(surrogate.send, client)
            assert [f.result().status_code for f in good] == [200] * 5
            assert_error(bad.result(), 422, "validation_error", "surrogate")


def _raw_http(base_url: str, request: bytes) -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello on the plain port
    b"GARBAGE\r\n\r\n",
], ids=["content-length-not-a-number", "content-length-twice", "tls-on-plain-http", "no-request-line"])
def test_malformed_http_is_refused_by_the_server(live: LiveServer, request_bytes: bytes) -> None:
    """Below the app: uvicorn (h11) refuses broken HTTP framing with 400 and closes the connection."""
    answer = _raw_http(live.base_url, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_barrage_concurrently_then_still_serving(live: LiveServer) -> None:
    """Every hostile case at once, 4 rounds, interleaved with normal requests on 8 threads."""
    good = answer_multipart()
    work: list[tuple[Hostile | None, Send]] = []
    for _ in range(4):
        work += [(case, case.send) for case in CASES]
        work += [(None, good)] * 8
    random.Random(3).shuffle(work)
    with live.client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda item: (item[0], item[1](client)), work))
        for case, response in responses:
            if case is None:
                assert response.status_code == 200, response.text[:300]
            else:
                assert_error(response, case.status, case.code, case.needle)
        metrics = client.get("/metrics").text
        after = client.post("/v1/answer", files={"image": ("a.png", GOOD_PNG)}, data={"question": Q})
    assert after.status_code == 200 and after.json()["answer"]
    counted = metric_values(metrics, "eas_requests_total")
    assert counted, "no request counts in /metrics"
    server_errors = {labels["code"]: value for labels, value in counted if labels["code"].startswith("5")}
    assert server_errors == {}, server_errors
    assert sum(value for labels, value in counted if labels["code"] == "200") >= 32


@pytest.mark.parametrize("body", [b"{oops", DEEP_JSON, b'{"model": 5}'], ids=["malformed", "deep", "invalid"])
def test_closed_admin_api_refuses_before_reading_the_body(live: LiveServer, body: bytes) -> None:
    """Auth comes first: FastAPI parsed a declared body before any dependency ran, so a closed admin API
    answered malformed JSON with 422 (and its validation details) instead of 403."""
    with live.client() as client:
        response = client.post("/admin/convert", content=body, headers={"content-type": "application/json"})
    assert_error(response, 403, "forbidden", "closed")
