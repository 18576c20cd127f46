"""Issue 17, H1/H2/M1: cost is bounded in the unit that costs, and nothing request-sized runs on the event loop.

- a question under the character limit but over the token limit is refused (422, both numbers named);
- a batch never pads short prompts to one much longer prompt, nor exceeds its padded-token budget;
- image decode and the processor run in the preprocessing pool, not on the event loop's thread, except a small
  image on an idle server (nobody waits behind it there);
- a PNG of many empty chunks is refused before Pillow walks them; public messages carry no object reprs;
- a huge or extremely long image is decoded towards the model's input size; EXIF orientation is applied;
- decoded-image memory in flight is bounded.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from typing import Any

import pytest
from PIL import Image

import service.preprocess as preprocess
from service.batching.batcher import fits_batch
from service.batching.work import WorkItem
from service.preprocess import DecodeBudget
from service.validation.images import ImageLimits, ModelInputSize, decode_for_model, public_detail
from tests.hardening.conftest import assert_error
from tests.service.conftest import image_bytes, make_settings, multipart, running_app

Q = "what colour is the shape?"
LIMITS = ImageLimits(("PNG", "JPEG", "WEBP"), 4096 * 4096, 8192)
CLIP = ModelInputSize(short=32, crop=(32, 32))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunk_bomb(chunks: int) -> bytes:
    """A valid 8x8 PNG with `chunks` empty ancillary chunks before its pixels."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    empty = _chunk(b"zzZz", b"")
    pixels = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + b"\x80" * 24 for _ in range(8))))
    return b"\x89PNG\r\n\x1a\n" + header + empty * chunks + pixels + _chunk(b"IEND", b"")


def _item(tokens: int) -> WorkItem:
    return WorkItem(image=None, question="q", max_new_tokens=1, deadline=0.0, loop=None,  # type: ignore[arg-type]
                    future=None, tokens=tokens)  # type: ignore[arg-type]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_prompt_over_the_token_limit_is_refused_naming_both_numbers(model_dirs) -> None:
    # 300 emoji: 300 characters (far under the 1,000-character limit) but ~1,200 byte-level tokens.
    async with running_app(make_settings(model_dirs, max_prompt_tokens=512)) as (_, client):
        response = await client.post("/v1/answer", **multipart(image_bytes(), "\U0001f600" * 300))
        error = assert_error(response, 422, "prompt_too_long")
        numbers = [int(w) for w in error["message"].replace(",", " ").split() if w.isdigit()]
        assert 512 in numbers and max(numbers) > 512, error
        assert (await client.post("/v1/answer", **multipart(image_bytes(), Q))).status_code == 200


def test_a_long_prompt_never_pads_short_ones() -> None:
    short = [_item(40), _item(60)]
    assert fits_batch(short, _item(50), 16384)
    assert not fits_batch(short, _item(1500), 16384)  # would pad both short rows to 1,500 tokens
    assert not fits_batch([_item(1500)], _item(40), 16384)  # nor join a long one
    assert fits_batch([_item(1500)], _item(1400), 16384)  # similar lengths batch together...
    assert not fits_batch([_item(1500)] * 10, _item(1500), 16384)  # ...within the padded-token budget
    assert fits_batch(short, _item(0), 16384)  # unknown length (shadow mirrors): no opinion


def _record_decode_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each image is decoded on, in order."""
    threads: list[str] = []
    original = preprocess.decode_for_model

    def recording(*args: Any) -> Image.Image:
        threads.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(preprocess, "decode_for_model", recording)
    return threads


@pytest.mark.anyio
async def test_decode_and_processor_run_off_the_event_loop(model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _record_decode_threads(monkeypatch)
    async with running_app(make_settings(model_dirs, prepare_inline_when_idle=False)) as (_, client):
        loop_thread = threading.current_thread().name
        response = await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert response.status_code == 200, response.text
    assert threads and all(name.startswith("preprocess") and name != loop_thread for name in threads)


@pytest.mark.anyio
async def test_on_an_idle_server_a_small_image_is_prepared_on_the_loop_and_otherwise_in_the_pool(
        model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.service.conftest import Gate

    threads = _record_decode_threads(monkeypatch)
    gate = Gate()
    async with running_app(make_settings(model_dirs, baseline_path=None), loader=gate.loader()) as (app, client):
        loop_thread = threading.current_thread().name
        pre = app.state.service.preprocessor
        alone = await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert alone.status_code == 200, alone.text
        assert threads == [loop_thread] and pre.inlined == 1
        # The same request as a large image (over 512x512 pixels): the pool, idle or not.
        assert (await client.post("/v1/answer", **multipart(_png((600, 600)), Q))).status_code == 200
        assert threads[-1].startswith("preprocess") and pre.inlined == 1
        # A refusal found while preparing inline is the same 422 as from the pool.
        assert_error(await client.post("/v1/answer", **multipart(image_bytes(), "what is <image>?")),
                     422, "reserved_marker")
        # While another request runs, a small image goes to the pool: the loop stays free for the others.
        gate.close()
        try:
            running = asyncio.ensure_future(client.post("/v1/answer", **multipart(image_bytes(), Q)))
            await asyncio.to_thread(gate.started.wait, 10)
            inlined = pre.inlined
            second = asyncio.ensure_future(client.post("/v1/answer", **multipart(image_bytes(), Q)))
            for _ in range(1000):
                if len(threads) == 4:
                    break
                await asyncio.sleep(0.01)
            assert threads[-1].startswith("preprocess") and pre.inlined == inlined
        finally:
            gate.open()
        assert (await running).status_code == 200 and (await second).status_code == 200


@pytest.mark.anyio
async def test_png_chunk_bomb_is_refused_before_pillow_walks_it(model_dirs) -> None:
    async with running_app(make_settings(model_dirs)) as (_, client):
        assert (await client.post("/v1/answer", **multipart(png_chunk_bomb(10), Q))).status_code == 200
        bomb = png_chunk_bomb(100_000)  # 1.2 MB of empty chunks
        assert_error(await client.post("/v1/answer", **multipart(bomb, Q)), 400, "invalid_image", "chunks")


def test_public_messages_carry_no_reprs_or_paths() -> None:
    text = public_detail(OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1d0e50> in /srv/x/y.png"))
    assert "0x" not in text and "BytesIO" not in text and "/srv" not in text


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def test_large_and_extreme_images_are_decoded_towards_the_model_size() -> None:
    long = decode_for_model(_png((8192, 1)), LIMITS, CLIP)
    assert long.size[0] <= 16 and long.size[1] == 1  # the processor would keep the middle 1x1 only
    big = decode_for_model(_png((4096, 4096)), LIMITS, CLIP)
    assert 64 <= min(big.size) < 128
    ordinary = decode_for_model(_png((48, 40)), LIMITS, CLIP)
    assert ordinary.size == (48, 40)  # what the processor saw before: untouched
    jpeg = io.BytesIO()
    Image.new("RGB", (2048, 2048), (200, 30, 30)).save(jpeg, "JPEG")
    assert max(decode_for_model(jpeg.getvalue(), LIMITS, CLIP).size) <= 256  # DCT-scaled while decoding


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert decode_for_model(buffer.getvalue(), LIMITS, None).size == (20, 40)


def test_decoded_memory_in_flight_is_bounded() -> None:
    budget = DecodeBudget(100)
    assert budget.try_take(80) and not budget.try_take(30)
    budget.give(80)
    assert budget.try_take(500)  # alone, any one image is allowed (the pixel limits bound it)
    assert not budget.try_take(1)


@pytest.mark.anyio
async def test_decode_memory_full_is_refused_with_retry_after(model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_app(make_settings(model_dirs)) as (app, client):
        app.state.service.preprocessor.budget.used = 1  # someone else holds decoded pixels...
        app.state.service.preprocessor.budget.limit = 2  # ...and nothing more fits
        response = await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert_error(response, 429, "overloaded")
        assert response.headers["retry-after"]
        app.state.service.preprocessor.budget.used = 0
        app.state.service.preprocessor.budget.limit = 1 << 30
        assert (await client.post("/v1/answer", **multipart(image_bytes(), Q))).status_code == 200
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_admitted_then_starved_is_429_with_retry_after_not_504(model_dirs) -> None:
    from tests.service.conftest import Gate

    gate = Gate()
    settings = make_settings(model_dirs, max_batch_size=1, max_queue_size=2, baseline_path=None,
                             default_deadline_ms=300)
    async with running_app(settings, loader=gate.loader()) as (_, client):
        gate.close()
        try:
            running = asyncio.ensure_future(client.post("/v1/answer", **multipart(image_bytes(), Q)))
            await asyncio.to_thread(gate.started.wait, 10)
            starved = await client.post("/v1/answer", **multipart(image_bytes(), Q))  # the server's own deadline
            assert_error(starved, 429, "overloaded")
            assert starved.headers["retry-after"]
        finally:
            gate.open()
        await running


@pytest.mark.anyio
async def test_large_images_have_their_own_short_lane(model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _record_decode_threads(monkeypatch)
    big = _png((1500, 1500))
    async with running_app(make_settings(model_dirs, baseline_path=None)) as (app, client):
        assert (await client.post("/v1/answer", **multipart(big, Q))).status_code == 200
        assert (await client.post("/v1/answer", **multipart(image_bytes(), Q))).status_code == 200
        assert threads[0].startswith("preprocess-large") and not threads[1].startswith("preprocess-large")
        pre = app.state.service.preprocessor
        pre._large_count = pre.large_waiting  # the large lane's line is full...
        full = await client.post("/v1/answer", **multipart(big, Q))
        assert_error(full, 429, "overloaded")
        assert full.headers["retry-after"]
        assert (await client.post("/v1/answer", **multipart(image_bytes(), Q))).status_code == 200  # ...not theirs
        pre._large_count = 0


def test_the_served_processor_s_input_size_is_known() -> None:
    from eas.zoo.llava import build_llava

    _, processor = build_llava(seed=0)
    assert ModelInputSize.of(processor.image_processor) == ModelInputSize(short=32, crop=(32, 32))
