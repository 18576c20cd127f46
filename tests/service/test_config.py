"""Settings from the environment, variant resolution from the model store, token checks, and `eas serve`
as a real process stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model_store import ModelStore
from service.app import create_app
from service.auth import TokenVerifier
from service.runner.resolve import resolve_variants
from service.settings import Settings
from tests.service.conftest import ModelDirs, image_bytes, multipart, running_app

REPO = Path(__file__).resolve().parents[2]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAS_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("EAS_ALLOWED_IMAGE_FORMATS", "png, jpeg")
    monkeypatch.setenv("EAS_API_TOKEN", "")
    monkeypatch.setenv("EAS_ADMIN_TOKEN", "zz-admin-secret")
    monkeypatch.setenv("EAS_LOAD_BASELINE", "false")
    monkeypatch.setenv("EAS_DTYPE", "bf16")
    settings = Settings()
    assert settings.max_batch_size == 4
    assert settings.allowed_image_formats == ["PNG", "JPEG"]
    assert settings.api_token is None
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "zz-admin-secret"
    assert "zz-admin-secret" not in repr(settings)
    assert settings.load_baseline is False and settings.dtype == "bf16"
    monkeypatch.setenv("EAS_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings()


def test_create_app_needs_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("EAS_"):
            monkeypatch.delenv(key)
    app = create_app()  # what `uvicorn --factory service.app:create_app` calls; loading starts at startup
    assert app.state.settings.model_store == Path("var/store")
    assert app.state.service.phase == "loading"


def test_token_verifier() -> None:
    verifier = TokenVerifier("tok")
    assert verifier.enabled
    assert verifier.verify("Bearer tok") and verifier.verify("BEARER tok")
    assert not verifier.verify("Bearer tok2") and not verifier.verify("Bearer TOK")
    assert not verifier.verify(None) and not verifier.verify("tok") and not verifier.verify("Bearer ")
    assert TokenVerifier(None).verify(None)


@pytest.fixture
def store(tmp_path: Path, model_dirs: ModelDirs) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.import_directory("tiny", model_dirs.baseline)  # v1, baseline, active (first version)
    return store


def test_resolve_from_store(store: ModelStore, model_dirs: ModelDirs) -> None:
    settings = Settings(model_store=store.root)
    [only] = resolve_variants(settings)
    assert (only.variant, only.model, only.version, only.kind) == ("baseline", "tiny", "v1", "baseline")
    store.import_directory("tiny", model_dirs.eas, kind="converted", parent=("tiny", "v1"), activate=True)
    eas, baseline = resolve_variants(settings)
    assert (eas.variant, eas.version, eas.kind, eas.parent) == ("eas", "v2", "converted", "tiny:v1")
    assert (baseline.variant, baseline.version) == ("baseline", "v1")
    assert [v.variant for v in resolve_variants(Settings(model_store=store.root, load_baseline=False))] == ["eas"]
    with pytest.raises(Exception, match="nope"):
        resolve_variants(Settings(model_store=store.root, model="nope"))


@pytest.mark.anyio
async def test_active_baseline_is_served_alone(store: ModelStore) -> None:
    settings = Settings(model_store=store.root, device="cpu", dtype="fp32")
    async with running_app(settings) as (_, client):
        response = await client.post("/v1/answer", **multipart(image_bytes(), "what colour?"))
        assert response.status_code == 200, response.text
        assert (response.json()["variant"], response.json()["version"]) == ("baseline", "v1")
        missing = await client.post("/v1/answer", **multipart(image_bytes(), "what colour?", variant="eas"))
        assert missing.status_code == 404
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["baseline"]


@pytest.mark.slow
def test_eas_serve_process_drains_on_sigterm(model_dirs: ModelDirs, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAS_")}
    env.update(EAS_MODEL_PATH=str(model_dirs.eas), EAS_DEVICE="cpu", EAS_SHUTDOWN_TIMEOUT_S="5",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from eas_tools.cli import app; app()", "serve", "--port",
                                 str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    if httpx.get(f"{base}/health/ready", trust_env=False, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            answer = httpx.post(f"{base}/v1/answer", trust_env=False, timeout=30,
                                **multipart(image_bytes(), "what colour?"))
            assert answer.status_code == 200
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    output = log_path.read_text()
    assert code in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal after a clean shutdown
    assert "draining" in output and "Traceback" not in output


@pytest.mark.anyio
@pytest.mark.parametrize(("admin_token", "header", "status"), [
    (None, "Bearer x", 403),  # admin API closed until a token is configured
    ("adm-tok", None, 401),
    ("adm-tok", "Bearer inference-tok", 401),  # the inference token is not an admin token
    ("adm-tok", "Bearer adm-tok", 200),
])
async def test_admin_token_dependency(model_dirs: ModelDirs, admin_token, header, status) -> None:
    from fastapi import Depends

    from service.deps import require_admin_token

    settings = Settings(model_path=model_dirs.eas, device="cpu", api_token="inference-tok",
                        admin_token=admin_token)
    app = create_app(settings)

    async def ping() -> dict:
        return {"ok": True}

    app.add_api_route("/admin/ping", ping, dependencies=[Depends(require_admin_token)])
    transport = httpx.ASGITransport(app=app)  # no lifespan needed: the route touches no model
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/admin/ping", headers={"Authorization": header} if header else {})
    assert response.status_code == status, response.text
