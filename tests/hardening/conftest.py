"""Shared pieces of the hardening suites: the tiny test models (the service tests' fixtures), a real uvicorn
on 127.0.0.1 serving them, the error-shape assertion and a Prometheus text reader."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.lifecycle import Loader, default_loader
from service.server import DrainingServer, background_server
from tests.service.conftest import ModelDirs, anyio_backend, make_settings, model_dirs  # noqa: F401 (fixtures)

__all__ = ["LiveServer", "assert_error", "metric_values", "start_server"]


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    app: FastAPI
    server: DrainingServer

    def client(self, **kwargs: Any) -> httpx.Client:
        # trust_env=False: never route loopback traffic through a proxy from the environment.
        return httpx.Client(base_url=self.base_url, trust_env=False, timeout=kwargs.pop("timeout", 30), **kwargs)


@contextlib.contextmanager
def start_server(dirs: ModelDirs, *, loader: Loader = default_loader, **overrides: Any) -> Iterator[LiveServer]:
    """A real DrainingServer on an OS-chosen loopback port, ready (models loaded and warm) when yielded."""
    app = create_app(make_settings(dirs, **overrides), loader=loader)
    with background_server(app, startup_timeout_s=60) as (base_url, server):
        yield LiveServer(base_url, app, server)


@pytest.fixture(scope="module")
def live(model_dirs: ModelDirs) -> Iterator[LiveServer]:  # noqa: F811 (the imported fixture)
    """One server per module with the default limits (question 1000 chars, 16 MiB bodies, 4096² pixels)."""
    with start_server(model_dirs) as server:
        yield server


def assert_error(response: httpx.Response, status: int, code: str | None = None, needle: str | None = None) -> dict:
    """The service's one error shape with this status; `needle` must appear in the message (case-insensitive)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "type", "param", "request_id"}, error
    assert error["message"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    if needle is not None:
        assert needle.lower() in error["message"].lower(), error
    return error


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in Prometheus text format, as (labels, value)."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            found.append((dict(_LABEL.findall(match["labels"] or "")), float(match["value"])))
    return found
