"""Property-based fuzzing of every operation in the service's OpenAPI document with schemathesis.

Cases are generated from the document (schema-valid ones, and schema-violating ones for operations with a
body or query) and sent to a real server on 127.0.0.1 serving a tiny model from a store, with the API and
admin APIs open to the test's token. Every answer must be below 500 and conform to the document: a
documented status, the documented content type, and a body matching the documented schema (the one error
shape included). Schemathesis' "schema-valid data is accepted" check is left out: an image the schema can
describe (any bytes) is almost never a decodable image, and a 400 for it is correct.

Bounded: EAS_FUZZ_EXAMPLES cases per operation and mode (default 50), derandomized so every run sends
the same cases; EAS_FUZZ_RANDOM=1 explores new ones (then failures print a @seed to reproduce).

schemathesis' pytest plugin (`schemathesis.pytest.from_fixture`) does not work with pytest 9, so the
cases come from `APIOperation.as_strategy` under plain hypothesis `@given`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, Phase, given, settings
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from model_store import ModelStore
from service.app import create_app
from service.server import background_server
from service.settings import Settings
from tests.hardening.conftest import LiveServer, assert_error
from tests.service.conftest import ModelDirs, make_settings

pytestmark = pytest.mark.fuzz

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# An unguessable store model name: a generated /admin/convert body can never name a real source model, so
# fuzzing never starts a real conversion job (the filter below makes sure of it).
MODEL = "fuzz-target-7f3c91"
EXAMPLES = int(os.environ.get("EAS_FUZZ_EXAMPLES", "50"))
RANDOM = os.environ.get("EAS_FUZZ_RANDOM", "") not in ("", "0")

# The document is built from the app factory alone (no model is loaded), so operations are known at
# collection time and each gets its own test id.
DOCUMENT = create_app(Settings(model_path=Path("/unused"))).openapi()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
# Schema-violating cases need something to violate: a body or query parameters (a path segment or a
# missing parameter list cannot be made invalid, hypothesis reports those as unsatisfiable).
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label, op in OPERATIONS.items() if op.body or len(op.query)]


def fuzz(operation: Any, mode: GenerationMode, call: Callable[[Any], Any], *,
         shrink: bool = True) -> collections.Counter[int]:
    """Send up to EXAMPLES generated cases; raises on the first 5xx or non-conforming answer (shrunk to a
    small reproducing case unless `shrink` is off)."""
    statuses: collections.Counter[int] = collections.Counter()
    strategy = operation.as_strategy(generation_mode=mode).filter(_never_a_real_conversion)
    phases = [p for p in Phase if p is not Phase.explain and (shrink or p is not Phase.shrink)]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=RANDOM)
    @given(case=strategy)
    def run(case: Any) -> None:
        response = call(case)
        statuses[response.status_code] += 1
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} " \
                                           f"{response.text}"
        excluded = [positive_data_acceptance]
        if case.media_type == "multipart/form-data":
            # Form fields are untyped text: a "schema-violating" null question arrives as the string "null".
            excluded.append(negative_data_rejection)
        case.validate_response(response, excluded_checks=excluded)

    run()
    return statuses


def _never_a_real_conversion(case: Any) -> bool:
    return not (isinstance(case.body, dict) and case.body.get("model") == MODEL)


@pytest.fixture(scope="module")
def fuzz_server(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Serving MODEL:v1 from a store, admin API and API both behind TOKEN, a short queue (fast 429s)."""
    store = ModelStore(tmp_path_factory.mktemp("fuzz") / "store")
    store.import_directory(MODEL, model_dirs.eas, kind="baseline", activate=True)
    app = create_app(make_settings(model_dirs, model_path=None, baseline_path=None, model_store=store.root,
                                   model=MODEL, api_token=TOKEN, admin_token=TOKEN, max_queue_size=8))
    with background_server(app, startup_timeout_s=60) as (base_url, server):
        yield LiveServer(base_url, app, server)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{mode.value}-{label}" for label, mode in CASES])
def test_generated_requests_never_get_a_5xx_and_answers_match_the_schema(
    fuzz_server: LiveServer, label: str, mode: GenerationMode
) -> None:
    statuses = fuzz(OPERATIONS[label], mode, lambda case: case.call(base_url=fuzz_server.base_url, headers=AUTH,
                                                                    timeout=30))
    assert sum(statuses.values()) >= 1
    if mode is GenerationMode.NEGATIVE:  # (each one is judged by schemathesis' negative-data check too)
        assert any(400 <= status < 500 for status in statuses), statuses
    with fuzz_server.client(headers=AUTH) as client:  # and the server still answers afterwards
        assert client.get("/health/ready").status_code == 200


class Item(BaseModel):
    name: str


def test_found_by_fuzzing_a_huge_job_offset_is_a_422(fuzz_server: LiveServer) -> None:
    """GET /admin/jobs?offset=10**30 reached SQLite, which cannot bind it: OverflowError, 500."""
    with fuzz_server.client(headers=AUTH) as client:
        response = client.get("/admin/jobs", params={"offset": str(10**30)})
    assert_error(response, 422, "validation_error", "offset")


def test_harness_catches_a_server_error() -> None:
    """The harness has teeth: on an app whose handler answers 500 for some valid input, it fails."""

    buggy = FastAPI()

    @buggy.post("/items")
    async def items(item: Item) -> Any:
        if len(item.name) > 3:  # the "bug"
            return JSONResponse({"detail": "boom"}, status_code=500)
        return {"name": item.name}

    schema = schemathesis.openapi.from_asgi("/openapi.json", buggy)
    operation = next(result.ok() for result in schema.get_all_operations())
    with pytest.raises(AssertionError, match="500"):
        fuzz(operation, GenerationMode.POSITIVE, lambda case: case.call(), shrink=False)


# --- the document itself ----------------------------------------------------------------------------

def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_in_the_document_resolves() -> None:
    """Request bodies given through openapi_extra used to carry pydantic's `#/$defs/...` references, which
    point nowhere in an OpenAPI document (the chat body was unusable for schema-driven clients)."""
    components = DOCUMENT["components"]["schemas"]
    refs = set(_refs(DOCUMENT["paths"]))
    assert refs, "expected some component references"
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components, ref


def test_every_operation_documents_the_error_shape() -> None:
    """Errors are documented as the service's error object; FastAPI's 422 body, never sent, is gone."""
    assert "HTTPValidationError" not in DOCUMENT["components"]["schemas"]
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            for status in ("4XX", "5XX"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
