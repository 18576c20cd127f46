"""eas_tools/bench/peers.py: the report's arithmetic and the shared request list (the servers themselves
are exercised by running the benchmark, docs/serving.md)."""

from __future__ import annotations

import argparse
import base64
import io
import os

import pytest
from PIL import Image

from eas_tools.bench.peers import (
    Cell,
    _variant,
    batch_totals,
    decode_body,
    format_summary,
    malloc_reuse_env,
    request_bodies,
    rows_per_call,
    summarise,
)
from service import allocator
from tests.service.test_allocator import TENSOR_PAGES, faults


def _cell(server: str, clients: int, rnd: int, requests: int, p50: float) -> Cell:
    return Cell(server=server, clients=clients, round=rnd, requests=requests, wall_s=1.0, p50_ms=p50,
                p90_ms=p50, errors=0)


def test_summary_pairs_rounds() -> None:
    cells = [_cell("eas-serve", 4, 0, 100, 10.0), _cell("litserve", 4, 0, 80, 12.0),
             _cell("eas-serve", 4, 1, 50, 20.0), _cell("litserve", 4, 1, 50, 20.0),  # a loaded round: both slow
             _cell("eas-serve", 4, 2, 90, 11.0), _cell("litserve", 4, 2, 75, 13.0)]
    rows = {r["server"]: r for r in summarise(cells, "eas-serve", ["litserve"])}
    assert rows["eas-serve"]["rps"] == 90 and rows["litserve"]["rps"] == 75
    assert rows["litserve"]["eas-serve_rps_ratio"] == pytest.approx(1.2)  # median of 1.25, 1.0, 1.2
    assert rows["litserve"]["eas-serve_p50_ratio"] == pytest.approx(11 / 13)
    assert "litserve" in format_summary(list(rows.values()), "eas-serve")


def test_requests_are_distinct_and_decode() -> None:
    bodies = request_bodies(8, max_new_tokens=5)
    assert len({b["image"] + b["question"] for b in bodies}) == 8
    image, question, max_new_tokens = decode_body(bodies[0])
    assert isinstance(image, Image.Image) and image.mode == "RGB" and max_new_tokens == 5
    assert Image.open(io.BytesIO(base64.b64decode(bodies[0]["image"]))).format == "PNG" and question


def test_mean_batch_from_per_answer_reports_and_from_the_metrics() -> None:
    # a call of 4 rows (4 answers reporting 4) and a call of 1: 5 rows in 2 calls
    assert rows_per_call([4, 4, 4, 4, 1]) == pytest.approx(2.5)
    assert rows_per_call([3, 3, 3]) == pytest.approx(3.0)
    text = "\n".join([
        "# TYPE eas_batch_size histogram",
        'eas_batch_size_bucket{le="1.0",model="m",variant="eas"} 2.0',
        'eas_batch_size_sum{model="m",variant="eas"} 30.0',
        'eas_batch_size_count{model="m",variant="eas"} 4.0',
        'eas_batch_size_sum{model="m",variant="baseline"} 6.0',
        'eas_batch_size_count{model="m",variant="baseline"} 2.0',
        'eas_batch_size_created{model="m",variant="eas"} 1.7e9',
    ])
    assert batch_totals(text) == (36.0, 6.0)


def test_peer_malloc_reuse_reaches_only_the_peers() -> None:
    args = argparse.Namespace(threads=1, peer_loop="transformers", peer_malloc_reuse=True)
    for peer in ("litserve", "naive"):
        assert malloc_reuse_env().items() <= _variant(peer, args)[3].items()
    assert not any(k.startswith("MALLOC_") for k in _variant("eas-serve", args)[3])  # it sets its own
    args.peer_malloc_reuse = False
    assert not any(k.startswith("MALLOC_") for k in _variant("naive", args)[3])


@pytest.mark.skipif(not allocator.GLIBC, reason="glibc only")
def test_the_peers_environment_is_what_glibc_reads() -> None:
    """The variables' names and values as glibc takes them at start: the same reuse as keep_freed_memory."""
    assert faults("default", env={**os.environ, **malloc_reuse_env()}) < TENSOR_PAGES
