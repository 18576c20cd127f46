"""What the OpenAPI document says beyond what FastAPI infers, so that it matches what the service sends.

- Every route can answer with the one error shape (`service/errors.py`) under any 4xx/5xx status. FastAPI
  would otherwise document only its own 422 body (`HTTPValidationError`), which this service never sends.
- Request-body schemas given through `openapi_extra` are not rewritten by FastAPI, so a pydantic schema
  with `$defs` would leave `#/$defs/...` references dangling at the document root: `standalone_schema`
  inlines them.
- `/openapi.json`, `/docs` and `/redoc` need the API token when one is set (issue 17): the document
  describes every route, the admin API included (`add_doc_routes`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field


class ErrorObject(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. `queue_full` (see docs/serving.md).")
    message: str = Field(description="What went wrong, naming the offending field or limit.")
    type: str = Field(description="OpenAI error type, e.g. `invalid_request_error`.")
    param: str | None = Field(None, description="The offending request field, when there is one.")
    request_id: str | None = Field(None, description="Also sent as the `X-Request-Id` header.")


class ErrorResponse(BaseModel):
    error: ErrorObject


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request was refused; `error.code` says why."},
    "5XX": {"model": ErrorResponse, "description": "Not ready, draining, overloaded, timed out, or a failure."},
}


def standalone_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every `$defs` reference inlined (the models used here are not recursive)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in seen:
                    raise ValueError(f"{model.__name__}: recursive schema through {name}")
                siblings = {k: resolve(v, seen) for k, v in node.items() if k != "$ref"}
                return {**resolve(definitions[name], (*seen, name)), **siblings}
            return {k: resolve(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, seen) for v in node]
        return node

    return resolve(schema)


def add_doc_routes(app: FastAPI) -> None:
    """FastAPI's three document routes, with the inference routes' token check in front."""
    from service.deps import require_api_token  # deps imports the service; imported late to keep this light

    guard = [Depends(require_api_token)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=guard)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")
