"""Issue 17's low-severity list, M2 (a broken active version is recoverable through the admin API) and M4
(store work off the event loop). Each test fails on the behaviour the issue describes."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path

import pytest

import service.admin.routes as admin_routes
from model_store import ModelStore
from tests.hardening.conftest import assert_error
from tests.service.conftest import image_bytes, make_settings, multipart, running_app
from tests.service.test_admin import AUTH, store_settings

pytestmark = pytest.mark.anyio
Q = "what colour is the shape?"
B64 = base64.b64encode(image_bytes()).decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_strict_numbers_and_invisible_questions(model_dirs) -> None:
    async with running_app(make_settings(model_dirs)) as (_, client):
        as_bool = await client.post("/v1/answer", json={"image": B64, "question": Q, "max_new_tokens": True})
        assert_error(as_bool, 422)
        underscored = await client.post("/v1/answer", **multipart(image_bytes(), Q, max_new_tokens="5_0"))
        assert_error(underscored, 422, needle="integer")
        deadline = await client.post("/v1/answer", headers={"X-Request-Deadline-Ms": "1_000"},
                                     **multipart(image_bytes(), Q))
        assert_error(deadline, 422)
        for invisible in ("\u200b\u200b", "\u2060\ufeff\u200d", "\u3164"):
            assert_error(await client.post("/v1/answer", **multipart(image_bytes(), invisible)), 422, needle="visible")
        image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}}
        stream_yes = await client.post("/v1/chat/completions", json={
            "stream": "yes", "messages": [{"role": "user", "content": [{"type": "text", "text": Q}, image_part]}]})
        assert_error(stream_yes, 422)


async def test_json_numbers_are_finite(model_dirs, tiny_store: ModelStore) -> None:
    """NaN, Infinity and 1e999 (inf to Python) are refused at parsing on every JSON route; an infinite
    learning rate used to reach the job store as a 500."""
    answer = '{"image": "%s", "question": "what?", "temperature": %s}'
    async with running_app(make_settings(model_dirs)) as (_, client):
        for number in ("NaN", "Infinity", "-Infinity", "1e999"):
            response = await client.post("/v1/answer", content=answer % (B64, number),
                                          headers={"Content-Type": "application/json"})
            assert_error(response, 400, needle="malformed JSON")
        fine = await client.post("/v1/answer", content=answer % (B64, "1e-999"),  # underflows to 0: greedy
                                 headers={"Content-Type": "application/json"})
        assert fine.status_code == 200, fine.text
    async with running_app(store_settings(tiny_store.root)) as (_, client):
        response = await client.post("/admin/convert", headers={**AUTH, "Content-Type": "application/json"},
                                     content='{"model": "tiny", "skip_count": 1, "lr": 1e999}')
        assert_error(response, 400, needle="out of range")


async def test_truncated_multipart_is_refused(model_dirs) -> None:
    boundary = "xyzzy"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image_bytes() + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{Q}").encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with running_app(make_settings(model_dirs)) as (_, client):
        assert_error(await client.post("/v1/answer", content=body, headers=headers), 400, "truncated_body")
        complete = body + f"\r\n--{boundary}--\r\n".encode()
        assert (await client.post("/v1/answer", content=complete, headers=headers)).status_code == 200


async def test_multipart_fields_are_as_strict_as_json(model_dirs) -> None:
    png = image_bytes()
    async with running_app(make_settings(model_dirs)) as (_, client):
        unknown = await client.post("/v1/answer", **multipart(png, Q, foo="1"))
        assert assert_error(unknown, 422, needle="unknown multipart field 'foo'")["param"] == "foo"
        twice = await client.post("/v1/answer", files=[("image", ("i.png", png, "image/png")),
                                                       ("question", (None, Q)), ("question", (None, "what?"))])
        assert assert_error(twice, 422, needle="appears 2 times")["param"] == "question"
        stops = await client.post("/v1/answer", files=[("image", ("i.png", png, "image/png")), ("question", (None, Q)),
                                                       ("stop", (None, "x")), ("stop", (None, "y"))])
        assert stops.status_code == 200, stops.text  # stop repeats by design


async def test_huge_json_bodies_are_refused_before_validation(model_dirs) -> None:
    many = [{"role": "user", "content": "hi"}] * 50_000
    async with running_app(make_settings(model_dirs)) as (_, client):
        response = await client.post("/v1/chat/completions", json={"messages": many})
        assert_error(response, 400, "json_too_complex")


async def test_docs_need_the_api_token_and_no_host_is_reflected(model_dirs) -> None:
    async with running_app(make_settings(model_dirs, api_token="tok")) as (_, client):
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"Authorization": "Bearer tok"})).status_code == 200, path
        slash = await client.post("/v1/answer/", headers={"Host": "evil.example"})
        assert slash.status_code == 404 and "evil.example" not in slash.headers.get("location", "")
    async with running_app(make_settings(model_dirs)) as (_, client):  # no token: open, as before
        assert (await client.get("/openapi.json")).status_code == 200


def _corrupt(store: ModelStore, name: str, version: str) -> None:
    path = Path(store.root) / "models" / name / version
    weights = next(p for p in path.rglob("*.safetensors"))
    weights.write_bytes(b"\0" * 64)


async def test_broken_active_version_stays_manageable(tiny_store: ModelStore, tiny_model_dir: Path) -> None:
    tiny_store.import_directory("tiny", tiny_model_dir, kind="baseline")  # v2, healthy
    _corrupt(tiny_store, "tiny", "v1")  # the active one
    async with running_app(store_settings(tiny_store.root)) as (_app, client):
        ready = await client.get("/health/ready")
        error = assert_error(ready, 503, "load_failed")
        assert str(tiny_store.root) not in error["message"] and "/tmp" not in error["message"]
        activated = await client.post("/admin/models/tiny/versions/v2/activate", headers=AUTH)
        assert activated.status_code == 200, activated.text
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.post("/v1/answer", **multipart(image_bytes(), Q))).status_code == 200


async def test_store_work_never_blocks_the_event_loop(tiny_store: ModelStore, monkeypatch) -> None:
    release = threading.Event()
    original = admin_routes.JobSupervisor.cancel

    def slow_cancel(self, job_id: str):  # a writer elsewhere holds the database lock
        release.wait(5)
        return original(self, job_id)

    monkeypatch.setattr(admin_routes.JobSupervisor, "cancel", slow_cancel)
    job = tiny_store.jobs.create("tiny", "v1", {"steps": 1})
    async with running_app(store_settings(tiny_store.root)) as (_, client):
        cancel = asyncio.ensure_future(client.delete(f"/admin/jobs/{job.id}", headers=AUTH))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        live = await client.get("/health/live")
        assert live.status_code == 200 and time.monotonic() - t0 < 2.0  # not frozen behind the lock
        release.set()
        assert (await cancel).status_code in (200, 202)


async def test_datasets_only_from_configured_roots(tiny_store: ModelStore, tmp_path: Path) -> None:
    outside = tmp_path.parent.parent.parent / "not-a-root.jsonl"
    async with running_app(store_settings(tiny_store.root, dataset_roots=[tmp_path / "data"])) as (_, client):
        for dataset in ("/etc/shadow", "/etc/passwd", str(outside), str(tmp_path / "data" / ".." / "x.jsonl")):
            response = await client.post("/admin/convert", headers=AUTH,
                                         json={"model": "tiny", "dataset": dataset, "steps": 1, "skip_count": 1})
            error = assert_error(response, 422, needle="dataset root")
            assert error["param"] == "dataset"
    assert tiny_store.jobs.select() == []


async def test_dataset_rows_name_images_only_under_the_roots(tiny_store: ModelStore, tmp_path: Path) -> None:
    """A dataset file inside a root whose rows point outside it (absolute, `..`, or a symlink) is refused
    before a job exists, with the same message whether the outside file exists or not (no oracle)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "in.png").write_bytes(image_bytes())
    (root / "link.png").symlink_to("/etc/hostname")
    settings = store_settings(tiny_store.root, dataset_roots=[root])
    cases = {"absolute_existing": "/etc/passwd", "absolute_missing": "/nonexistent/x.png",
             "dotdot": "../../outside.png", "symlink": "link.png"}
    async with running_app(settings) as (_, client):
        messages = set()
        for name, image in cases.items():
            dataset = root / f"{name}.jsonl"
            rows = [{"image": "in.png", "question": "q?", "answer": "a"},
                    {"image": image, "question": "q?", "answer": "a"}]
            dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
            response = await client.post("/admin/convert", headers=AUTH,
                                         json={"model": "tiny", "dataset": str(dataset), "steps": 1, "skip_count": 1})
            error = assert_error(response, 422, needle="outside the dataset roots")
            assert error["param"] == "dataset" and "lines 2" in error["message"]
            messages.add(error["message"].replace(str(dataset), ""))
        assert len(messages) == 1  # existing and missing outside files read the same
        # Negative control: a dataset whose rows stay inside the root is accepted.
        good = root / "good.jsonl"
        good.write_text(json.dumps({"image": "in.png", "question": "q?", "answer": "a"}) + "\n")
        accepted = await client.post("/admin/convert", headers=AUTH,
                                     json={"model": "tiny", "dataset": str(good), "steps": 1, "skip_count": 1})
        assert accepted.status_code == 202, accepted.text
