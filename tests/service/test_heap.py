"""The frozen heap (service/heap.py): start-up and activation leave the loaded objects out of later full
collections, and a model replaced by an activation is still freed."""

from __future__ import annotations

import dataclasses
import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from service import heap
from tests.service.conftest import ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the suite runs with an ordinary heap


def test_settle_freezes_and_full_collections_get_cheap() -> None:
    junk = [[object()] for _ in range(200_000)]  # long-lived objects, as a loaded model has
    t0 = time.perf_counter()
    gc.collect()
    before = time.perf_counter() - t0
    heap.settle()
    assert gc.get_freeze_count() >= len(junk)
    t0 = time.perf_counter()
    gc.collect()
    after = time.perf_counter() - t0
    assert after < before  # the frozen objects are not walked again
    heap.thaw()
    assert gc.get_freeze_count() == 0


def test_frozen_cycles_outlive_their_references_until_thawed() -> None:
    class Node:
        pass

    node = Node()
    node.self = node  # type: ignore[attr-defined]
    ref = weakref.ref(node)
    heap.settle()
    del node
    gc.collect()
    assert ref() is not None  # why a retired model must be thawed before it is dropped
    heap.thaw()
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("thaw", [True, False], ids=["thawed", "negative-control"])
async def test_replaced_model_is_freed_with_a_frozen_heap(model_dirs: ModelDirs, thaw: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if not thaw:
        monkeypatch.setattr(heap, "thaw", lambda: None)
    async with running_app(make_settings(model_dirs, baseline_path=None, gc_freeze=True)) as (app, client):
        service = app.state.service
        assert gc.get_freeze_count() > 0  # settled at start-up
        old = service.registry.get("eas")
        model = weakref.ref(old.runner.model.model)
        new_info = dataclasses.replace(old.info, version="v2", path=model_dirs.baseline)
        await service.replace_variant(new_info, default=True)
        del old
        service.resettle()  # what an activation ends with (service/admin/activation.py)
        assert (model() is None) is thaw
        response = await client.post("/v1/answer", **multipart(image_bytes(), "what colour is the circle?"))
        assert response.status_code == 200 and response.json()["version"] == "v2"


async def test_off_by_setting(model_dirs: ModelDirs) -> None:
    async with running_app(make_settings(model_dirs, baseline_path=None, gc_freeze=False)):
        assert gc.get_freeze_count() == 0
