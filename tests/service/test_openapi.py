"""The OpenAPI document is generated from the models the routes return and read, not written beside them.

(That the live answers conform to the document is fuzzed in tests/hardening/test_fuzz.py.)
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.app import create_app
from service.openapi import standalone_schema
from service.routes import answer, chat, health, models
from service.routes.answer import AnswerResponse
from service.routes.chat import ChatCompletion
from service.routes.health import Liveness, Readiness
from service.routes.models import Info, ModelList
from service.settings import Settings
from service.validation.chat import ChatCompletionRequest
from service.validation.requests import AnswerForm, AnswerJSON

APP = create_app(Settings(model_path=Path("/unused")))  # the document needs no model loaded
DOCUMENT = APP.openapi()
COMPONENTS = DOCUMENT["components"]["schemas"]
RESPONSE_MODELS: list[tuple[str, str, type[BaseModel]]] = [
    ("post", "/v1/answer", AnswerResponse),
    ("post", "/v1/chat/completions", ChatCompletion),
    ("get", "/v1/models", ModelList),
    ("get", "/info", Info),
    ("get", "/health/ready", Readiness),
    ("get", "/health", Readiness),
    ("get", "/health/live", Liveness),
]


def _route(method: str, path: str) -> APIRoute:
    routes = [r for module in (answer, chat, health, models) for r in module.router.routes]
    return next(r for r in routes if isinstance(r, APIRoute) and r.path == path and method.upper() in r.methods)


def _without_nulls(node: Any) -> Any:
    """As FastAPI writes the document: it leaves out every null (a pydantic `default: null` included)."""
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_without_nulls(v) for v in node]
    return node


@pytest.mark.parametrize(("method", "path", "model"), RESPONSE_MODELS, ids=[p for _, p, _ in RESPONSE_MODELS])
def test_the_200_schema_is_generated_from_the_model_the_route_returns(method: str, path: str,
                                                                      model: type[BaseModel]) -> None:
    response = DOCUMENT["paths"][path][method]["responses"]["200"]
    assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
    expected = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
    for name, schema in {**expected.pop("$defs", {}), model.__name__: expected}.items():
        assert COMPONENTS[name] == _without_nulls(schema), name
    # ... and the route returns that model (FastAPI serialises it), not a dict it builds beside it.
    route = _route(method, path)
    assert route.response_model is model
    returned = typing.get_type_hints(route.endpoint)["return"]
    assert model in (typing.get_args(returned) or (returned,)), returned


def test_the_stream_stays_documented_beside_the_json_completion() -> None:
    content = DOCUMENT["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}


@pytest.mark.parametrize(("path", "media", "model"), [
    ("/v1/answer", "multipart/form-data", AnswerForm),
    ("/v1/answer", "application/json", AnswerJSON),
    ("/v1/chat/completions", "application/json", ChatCompletionRequest),
])
def test_request_body_schemas_are_generated_from_models(path: str, media: str, model: type[BaseModel]) -> None:
    body = DOCUMENT["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"][media]["schema"] == _without_nulls(standalone_schema(model))


def test_the_form_schema_states_what_the_form_reader_checks() -> None:
    """What the multipart schema says (as the hand-written schema did before it): the image is a file, the
    question is required and not blank, variant is one of three names, max_new_tokens at least 1, no other
    fields, and no null anywhere (a form field cannot be null)."""
    schema: dict[str, Any] = DOCUMENT["paths"]["/v1/answer"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]
    properties = schema["properties"]
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"image", "question"}
    assert properties["image"]["type"] == "string" and properties["image"]["format"] == "binary"
    assert properties["question"]["pattern"] == r"\S"
    assert properties["variant"]["enum"] == ["eas", "baseline", "auto"]
    assert properties["max_new_tokens"]["type"] == "integer" and properties["max_new_tokens"]["minimum"] == 1
    assert "null" not in repr(schema) and "None" not in repr(schema) and "anyOf" not in repr(schema)
