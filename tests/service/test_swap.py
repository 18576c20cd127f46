"""Hot swap of a variant's runner (the seam for later hot activation): the new version loads and warms
beside the old, new requests go to it at once, and a request already admitted to the old runner still
completes there."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from service.lifecycle import default_loader
from tests.service.conftest import Gate, ModelDirs, image_bytes, make_settings, multipart, running_app

pytestmark = pytest.mark.anyio

Q = "what colour is the circle?"


async def test_swap_keeps_in_flight_requests_on_their_runner(model_dirs: ModelDirs) -> None:
    gate = Gate()
    gated = gate.loader()

    def loader(info, settings):  # only the original version is held by the gate
        return gated(info, settings) if info.version == "local" else default_loader(info, settings)

    async with running_app(make_settings(model_dirs, baseline_path=None), loader=loader) as (app, client):
        service = app.state.service
        old = service.registry.get("eas")
        gate.close()
        in_flight = asyncio.create_task(client.post("/v1/answer", **multipart(image_bytes(), Q)))
        await asyncio.to_thread(gate.started.wait, 10)

        new_info = dataclasses.replace(old.info, version="v2", path=model_dirs.baseline)
        swap = asyncio.create_task(service.replace_variant(new_info, default=True))
        while service.registry.get("eas") is old:
            await asyncio.sleep(0.01)
        after = await client.post("/v1/answer", **multipart(image_bytes(), Q))
        assert after.status_code == 200 and after.json()["version"] == "v2"
        assert not swap.done()  # still waiting for the old runner's in-flight request

        gate.open()
        before = await in_flight
        assert before.status_code == 200 and before.json()["version"] == "local"
        assert await asyncio.wait_for(swap, 10) is old
        await asyncio.to_thread(old.batcher.join, 5)
        info_lines = [line for line in (await client.get("/metrics")).text.splitlines()
                      if line.startswith("eas_model_info{")]
        assert len(info_lines) == 1 and 'version="v2"' in info_lines[0]
