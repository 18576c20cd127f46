"""Admin API: auth on every route, conversion jobs end to end in worker processes, validation and
conflicts, cancel, expiry of finished jobs, refusal of a corrupted version, hot activation under continuous
traffic, and importing a checkpoint directory (with each refusal naming its problem)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_store import ModelStore
from service.settings import Settings
from tests.service.conftest import TEST_DEVICE, TEST_DTYPE, ModelDirs, image_bytes, multipart, running_app

pytestmark = pytest.mark.anyio

TOKEN = "adm-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = dict(criterion="uniform", skip_count=2, steps=4, batch_size=4, val_size=8, calibration_samples=4,
            evaluate_accuracy=False, latency_runs=1, latency_prompts=1, latency_new_tokens=2, device="cpu")
SLOW = {**FAST, "steps": 100_000}

ROUTES = [
    ("POST", "/admin/convert", {"model": "tiny", **FAST}),
    ("GET", "/admin/jobs", None),
    ("GET", "/admin/jobs/some-id", None),
    ("DELETE", "/admin/jobs/some-id", None),
    ("GET", "/admin/models", None),
    ("POST", "/admin/models/tiny/versions/v1/activate", None),
    ("POST", "/admin/models/tiny/versions", {"path": "/nonexistent"}),
]


@pytest.fixture
def store_root(tiny_store: ModelStore) -> Path:
    return tiny_store.root


@pytest.fixture
def dataset(shapes_jsonl: Path) -> str:
    return str(shapes_jsonl)


def store_settings(root: Path, **overrides: Any) -> Settings:
    # Datasets only from configured roots (issue 17): the session's temporary tree holds the test datasets.
    values: dict[str, Any] = dict(model_store=root, model="tiny", device=TEST_DEVICE, dtype=TEST_DTYPE,
                                  max_batch_wait_ms=2.0, admin_token=TOKEN, api_token=None, shutdown_timeout_s=5.0,
                                  dataset_roots=[root.parent.parent])
    values.update(overrides)
    return Settings(**values)


async def wait_job(client: httpx.AsyncClient, job_id: str, *, until=lambda j: j["status"] in
                   ("succeeded", "failed", "cancelled"), timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (await client.get(f"/admin/jobs/{job_id}", headers=AUTH)).json()
        if until(job):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach the state in {timeout_s} s: {job}")


@pytest.mark.parametrize("token,header,status", [(None, AUTH, 403), (TOKEN, {}, 401),
                                                 (TOKEN, {"Authorization": "Bearer wrong"}, 401)])
async def test_every_admin_route_refuses_without_the_right_token(store_root: Path, token, header, status) -> None:
    async with running_app(store_settings(store_root, admin_token=token)) as (_app, client):
        for method, url, body in ROUTES:
            response = await client.request(method, url, json=body, headers=header)
            assert response.status_code == status, (method, url, response.text)
            assert response.json()["error"]["code"] in ("forbidden", "unauthorized")
    store = ModelStore(store_root)
    assert store.jobs.select() == [] and [v.version for v in store.list_versions("tiny")] == ["v1"]
    assert store.active("tiny").version == "v1"


async def test_conversion_job_end_to_end_then_hot_activation_without_failures(store_root: Path, dataset: str) -> None:
    async with running_app(store_settings(store_root)) as (_app, client):
        response = await client.post("/admin/convert", json={"model": "tiny", "dataset": dataset, **FAST},
                                     headers=AUTH)
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["Location"] == f"/admin/jobs/{job['id']}" and job["status"] == "queued"
        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["version"] == "v2" and done["result"]["skipped"] == [1, 3]
        listed = (await client.get("/admin/jobs", headers=AUTH)).json()
        assert listed["total"] == 1 and listed["jobs"][0]["id"] == job["id"]
        models = (await client.get("/admin/models", headers=AUTH)).json()
        assert models["models"][0]["active"] == "v1" and len(models["models"][0]["versions"]) == 2
        assert models["served"] == [{"variant": "baseline", "model": "tiny", "version": "v1"}]

        # Continuous traffic while v2 is activated: every request must succeed.
        statuses: list[int] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                r = await client.post("/v1/answer", **multipart(image_bytes(), "what color is the shape?"))
                statuses.append(r.status_code)

        clients = [asyncio.create_task(traffic()) for _ in range(4)]
        await asyncio.sleep(0.3)
        activated = await client.post("/admin/models/tiny/versions/v2/activate", headers=AUTH)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
        assert activated.status_code == 200, activated.text
        assert {s["variant"] for s in activated.json()["serving"]} == {"eas", "baseline"}
        assert len(statuses) > 8 and set(statuses) == {200}
        answer = await client.post("/v1/answer", **multipart(image_bytes(), "what color?"))
        assert answer.json()["variant"] == "eas" and answer.json()["version"] == "v2"
        served = {v["variant"]: v for v in (await client.get("/info")).json()["variants"]}
        assert served["eas"]["skipped_layers"] == [1, 3] and served["baseline"]["skipped_layers"] == []
    assert ModelStore(store_root).active("tiny").version == "v2"


async def test_activate_flag_hot_activates_after_success(store_root: Path, dataset: str) -> None:
    async with running_app(store_settings(store_root)) as (app, client):
        response = await client.post("/admin/convert", headers=AUTH,
                                     json={"model": "tiny", "dataset": dataset, "activate": True, **FAST})
        done = await wait_job(client, response.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        deadline = time.monotonic() + 30
        while app.state.service.registry.default_variant != "eas" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        answer = await client.post("/v1/answer", **multipart(image_bytes(), "what color?"))
        assert answer.json()["variant"] == "eas"
    assert ModelStore(store_root).active("tiny").version == "v2"


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "criterion": "nonsense"}, "criterion"),
    ({"model": "tiny", "skip_fraction": 1.5}, "skip_fraction"),
    ({"model": "tiny", "skip_count": 1, "skip_fraction": 0.5}, None),
    ({"model": "nobody"}, "model"),
    ({"model": "tiny", "version": "v9"}, "version"),
    ({"model": "tiny", "dataset": "/no/such/file.jsonl"}, "dataset"),
    ({"model": "tiny", "store": "/tmp/elsewhere"}, None),
    ({"model": "tiny", "out": "/tmp/elsewhere"}, "out"),
    ({"model": "tiny", "activate": "perhaps"}, "activate"),
])
async def test_invalid_conversions_are_refused_with_422_before_any_work(store_root: Path, body, param) -> None:
    async with running_app(store_settings(store_root)) as (_app, client):
        response = await client.post("/admin/convert", json={"skip_count": 2, **body} if "skip" not in str(body)
                                     else body, headers=AUTH)
        assert response.status_code == 422, response.text
        if param:
            assert param in response.text
    assert ModelStore(store_root).jobs.select() == []


async def test_conflict_idempotency_and_cancel(store_root: Path, dataset: str) -> None:
    async with running_app(store_settings(store_root)) as (_app, client):
        body = {"model": "tiny", "dataset": dataset, **SLOW}
        first = await client.post("/admin/convert", json=body, headers={**AUTH, "Idempotency-Key": "k1"})
        assert first.status_code == 202
        job_id = first.json()["id"]
        again = await client.post("/admin/convert", json=body, headers={**AUTH, "Idempotency-Key": "k1"})
        assert again.status_code == 202 and again.json()["id"] == job_id
        keyed = {**AUTH, "Idempotency-Key": "k1"}
        changed = await client.post("/admin/convert", json={**body, "seed": 7}, headers=keyed)
        assert changed.status_code == 409 and changed.json()["error"]["code"] == "conversion_conflict"
        second = await client.post("/admin/convert", json={**body, "seed": 8}, headers=AUTH)
        assert second.status_code == 409 and job_id in second.json()["error"]["message"]
        assert second.json()["error"]["code"] == "conversion_conflict"
        await wait_job(client, job_id, until=lambda j: j["stage"].startswith("train"))
        cancel = await client.delete(f"/admin/jobs/{job_id}", headers=AUTH)
        assert cancel.status_code == 202
        done = await wait_job(client, job_id, timeout_s=30)
        assert done["status"] == "cancelled"
        again_cancel = await client.delete(f"/admin/jobs/{job_id}", headers=AUTH)
        assert again_cancel.status_code == 200 and again_cancel.json()["status"] == "cancelled"
        missing = await client.get("/admin/jobs/nope", headers=AUTH)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        missing_cancel = await client.delete("/admin/jobs/nope", headers=AUTH)
        assert missing_cancel.status_code == 404 and missing_cancel.json()["error"]["code"] == "job_not_found"
    store = ModelStore(store_root)
    assert [v.version for v in store.list_versions("tiny")] == ["v1"]


async def test_server_expires_finished_jobs_but_never_a_running_one(store_root: Path, dataset: str) -> None:
    store = ModelStore(store_root)
    old = store.jobs.create("tiny", "v1", {"seed": 1})
    store.jobs.update(old.id, status="running")
    store.jobs.update(old.id, status="failed", error="left by an earlier server")

    async def listed() -> dict[str, str]:
        jobs = (await client.get("/admin/jobs", headers=AUTH)).json()["jobs"]
        return {job["id"]: job["status"] for job in jobs}

    # A 1 s ttl: the server expires finished jobs every min(ttl, 60 s) = 1 s.
    async with running_app(store_settings(store_root, job_ttl_s=1.0)) as (_app, client):
        response = await client.post("/admin/convert", json={"model": "tiny", "dataset": dataset, **SLOW},
                                     headers=AUTH)
        job_id = response.json()["id"]
        await wait_job(client, job_id, until=lambda j: j["stage"].startswith("train"))
        deadline = time.monotonic() + 15
        while old.id in await listed() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await listed() == {job_id: "running"}  # the old finished job is gone
        await asyncio.sleep(2.5)  # several expiry rounds while the job, older than the ttl, still runs
        assert await listed() == {job_id: "running"}
        await client.delete(f"/admin/jobs/{job_id}", headers=AUTH)
        assert (await wait_job(client, job_id, timeout_s=30))["status"] == "cancelled"


async def test_corrupted_version_is_refused_and_current_model_keeps_serving(
    store_root: Path, model_dirs: ModelDirs
) -> None:
    store = ModelStore(store_root)
    bad = store.import_directory("tiny", model_dirs.baseline, kind="baseline")
    weights = bad.path / "model.safetensors"
    os.chmod(weights, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    async with running_app(store_settings(store_root)) as (_app, client):
        response = await client.post(f"/admin/models/tiny/versions/{bad.version}/activate", headers=AUTH)
        assert response.status_code == 409 and "model.safetensors" in response.json()["error"]["message"]
        assert response.json()["error"]["code"] == "version_corrupted"
        answer = await client.post("/v1/answer", **multipart(image_bytes(), "what color?"))
        assert answer.status_code == 200 and answer.json()["version"] == "v1"
        unknown = await client.post("/admin/models/tiny/versions/v99/activate", headers=AUTH)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "version_not_found"
    assert ModelStore(store_root).active("tiny").version == "v1"


# --- POST /admin/models/{name}/versions: import a checkpoint directory -------------------------------------


def damaged_copy(source: Path, target: Path, damage) -> Path:
    shutil.copytree(source, target)
    damage(target)
    return target


def as_bert(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["architectures"], config["model_type"] = ["BertModel"], "bert"
    (directory / "config.json").write_text(json.dumps(config))


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])


async def test_import_adds_a_baseline_version_and_can_hot_activate_it(store_root: Path, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    user_dir = damaged_copy(tiny_model_dir, tmp_path / "my-llava", lambda d: None)
    async with running_app(store_settings(store_root)) as (_app, client):
        created = await client.post("/admin/models/mine/versions", json={"path": str(user_dir)}, headers=AUTH)
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["version"]["name"], body["version"]["version"], body["version"]["kind"]) == ("mine", "v1",
                                                                                                  "baseline")
        assert body["version"]["metadata"]["imported_from"] == str(user_dir)
        assert body["checkpoint"]["model_class"] == "LlavaForConditionalGeneration"
        assert body["links"]["activate"] == "/admin/models/mine/versions/v1/activate"

        again = await client.post("/admin/models/tiny/versions", json={"path": str(user_dir), "activate": True},
                                  headers=AUTH)
        assert again.status_code == 201, again.text
        assert again.json()["serving"] == [{"variant": "baseline", "model": "tiny", "version": "v2"}]
        answer = await client.post("/v1/answer", **multipart(image_bytes(), "what color?"))
        assert answer.status_code == 200 and answer.json()["version"] == "v2"
    store = ModelStore(store_root)
    assert [v.version for v in store.list_versions("mine")] == ["v1"]
    assert store.active("tiny").version == "v2" and store.get_version("tiny", "v2").kind == "baseline"


@pytest.mark.parametrize("damage,needle", [
    (as_bert, "unsupported model class BertModel"),
    (lambda d: (d / "processor_config.json").unlink(), "no processor"),
    (truncate_weights, "weights file model.safetensors is unreadable"),
    (lambda d: None, "not a directory"),  # the path names a file inside the directory, below
    (lambda d: None, "no such directory"),
], ids=["bad-class", "no-processor", "unreadable-weights", "not-a-directory", "missing"])
async def test_import_refusals_name_the_problem_and_write_nothing(store_root: Path, tiny_model_dir: Path,
                                                                 tmp_path: Path, damage, needle: str) -> None:
    directory = damaged_copy(tiny_model_dir, tmp_path / "model", damage)
    path = {"not a directory": directory / "config.json", "no such directory": tmp_path / "gone"}.get(needle,
                                                                                                   directory)
    async with running_app(store_settings(store_root)) as (_app, client):
        response = await client.post("/admin/models/mine/versions", json={"path": str(path)}, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "path" and needle in error["message"] and str(path) in error["message"]
    assert ModelStore(store_root).list_models() == ["tiny"]


async def test_import_request_errors(store_root: Path, tiny_model_dir: Path) -> None:
    async with running_app(store_settings(store_root)) as (_app, client):
        relative = await client.post("/admin/models/mine/versions", json={"path": "models/mine"}, headers=AUTH)
        bad_name = await client.post("/admin/models/.mine/versions", json={"path": str(tiny_model_dir)},
                                     headers=AUTH)
        extra = await client.post("/admin/models/mine/versions", json={"path": str(tiny_model_dir), "kind": "x"},
                                  headers=AUTH)
        not_json = await client.post("/admin/models/mine/versions", content=b"path=x", headers=AUTH)
    assert relative.status_code == 422 and "must be absolute" in relative.json()["error"]["message"]
    assert bad_name.status_code == 422 and bad_name.json()["error"]["param"] == "name"
    assert extra.status_code == 422 and not_json.status_code in (400, 415)
    assert ModelStore(store_root).list_models() == ["tiny"]
