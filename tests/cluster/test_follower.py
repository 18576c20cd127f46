"""The follower's decisions, without models: when it swaps, when it leaves the replica alone, and when it is
started at all (service/runner/follower.py). The end-to-end behaviour is tests/cluster/test_two_replicas.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model_store import ModelStore
from service.lifecycle import Phase
from service.runner.follower import ActiveFollower, start_follower
from service.settings import Settings
from tests.model_store.helpers import dummy_writer


class FakeService:
    """What the follower reads of a Service: the phase and the runner registry's default variant."""

    def __init__(self, model: str, version: str) -> None:
        self.phase = Phase.READY
        self.serving = (model, version)
        self.registry = SimpleNamespace(default_variant="baseline", get=self._get)

    def _get(self, _variant: str) -> Any:
        return SimpleNamespace(info=SimpleNamespace(model=self.serving[0], version=self.serving[1]))


def _follower(tmp_path: Path, *, fail: set[str] | None = None) -> tuple[ActiveFollower, ModelStore, list[str]]:
    store = ModelStore(tmp_path / "store")
    for payload in (b"1", b"2", b"3"):
        store.add_version("m", dummy_writer(payload), kind="baseline")
    service = FakeService("m", "v1")
    swaps: list[str] = []

    async def activate(name: str, version: str) -> None:
        swaps.append(version)
        if version in (fail or set()):
            raise RuntimeError(f"{version} does not load")
        service.serving = (name, version)

    return ActiveFollower(service, store, activate, model=None, interval_s=0.01), store, swaps  # type: ignore[arg-type]


def test_follows_the_registry_and_only_when_it_moved(tmp_path: Path) -> None:
    follower, store, swaps = _follower(tmp_path)
    assert asyncio.run(follower.poll_once()) is False and swaps == []  # v1 active, v1 served
    store.activate("m", "v3")  # another process moved the pointer
    assert asyncio.run(follower.poll_once()) is True and swaps == ["v3"]
    assert follower.served() == ("m", "v3") and follower.swaps == 1
    assert asyncio.run(follower.poll_once()) is False and swaps == ["v3"]  # nothing moved since


def test_a_version_that_fails_to_load_is_not_retried_until_the_pointer_moves(tmp_path: Path) -> None:
    follower, store, swaps = _follower(tmp_path, fail={"v2"})
    store.activate("m", "v2")
    assert asyncio.run(follower.poll_once()) is False
    assert asyncio.run(follower.poll_once()) is False
    assert swaps == ["v2"] and follower.served() == ("m", "v1")  # tried once, still serving what it had
    store.activate("m", "v3")
    assert asyncio.run(follower.poll_once()) is True and follower.served() == ("m", "v3")


@pytest.mark.parametrize("phase", [Phase.LOADING, Phase.DRAINING, Phase.STOPPED])
def test_no_swap_while_loading_or_shutting_down(tmp_path: Path, phase: Phase) -> None:
    follower, store, swaps = _follower(tmp_path)
    store.activate("m", "v2")
    follower.service.phase = phase
    assert asyncio.run(follower.poll_once()) is False and swaps == []


def test_the_follow_loop_swaps_within_a_few_intervals(tmp_path: Path) -> None:
    follower, store, swaps = _follower(tmp_path)

    async def scenario() -> None:
        follower.start()
        store.activate("m", "v2")
        for _ in range(500):
            if follower.served() == ("m", "v2"):
                break
            await asyncio.sleep(0.01)
        await follower.stop()

    asyncio.run(scenario())
    assert swaps == ["v2"] and follower.served() == ("m", "v2")


def test_started_by_default_only_with_a_postgresql_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_root = tmp_path / "store"
    ModelStore(store_root).add_version("m", dummy_writer(), kind="baseline")
    service = FakeService("m", "v1")

    def started(settings: Settings) -> bool:
        service.settings = settings

        async def run() -> bool:
            follower = await start_follower(service, None, None)  # type: ignore[arg-type]
            if follower is not None:
                await follower.stop()
            return follower is not None

        return asyncio.run(run())

    monkeypatch.delenv("EAS_REGISTRY_URL", raising=False)
    assert not started(Settings(model_store=store_root))  # SQLite, one server: nothing to follow
    assert started(Settings(model_store=store_root, follow_active=True))  # asked for: works on SQLite too
    assert not started(Settings(model_path=tmp_path, follow_active=True))  # serving a directory, not the store
    monkeypatch.setenv("EAS_REGISTRY_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert not started(Settings(model_store=store_root, follow_active=False))


def test_on_by_default_with_a_postgresql_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  postgres_server: Any) -> None:
    monkeypatch.setenv("EAS_REGISTRY_URL", postgres_server.new_database())
    store_root = tmp_path / "store"
    ModelStore(store_root).add_version("m", dummy_writer(), kind="baseline")
    service = FakeService("m", "v1")
    service.settings = Settings(model_store=store_root)

    async def run() -> bool:
        follower = await start_follower(service, None, None)  # type: ignore[arg-type]
        if follower is not None:
            await follower.stop()
        return follower is not None

    assert asyncio.run(run())
