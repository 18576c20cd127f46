"""One error taxonomy and one JSON error shape for every route (serving-conventions §1-2).

Body: `{"error": {"code", "message", "type", "param", "request_id"}}` — the OpenAI error object (which the
`openai` client parses) plus the request id. FastAPI's own 404/405/422 and unexpected exceptions are
rewritten into the same shape; a stack trace never reaches the client, only the log. The model store's
errors reach HTTP through one table here (`STORE_ERRORS`), so routes let them propagate.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model_store import errors as store_errors

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a defined HTTP answer. `reason` feeds `eas_requests_rejected_total`."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"
    reason: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})


class BadRequest(ServiceError):
    status, code, type, reason = 400, "bad_request", "invalid_request_error", "invalid_request"


class InvalidImage(BadRequest):
    code, reason = "invalid_image", "invalid_image"


class Unauthorized(ServiceError):
    status, code, type, reason = 401, "unauthorized", "authentication_error", "unauthorized"

    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status, code, type, reason = 403, "forbidden", "permission_error", "forbidden"


class NotFound(ServiceError):
    status, code, type = 404, "not_found", "invalid_request_error"


class Conflict(ServiceError):
    status, code, type = 409, "conflict", "invalid_request_error"


class PayloadTooLarge(ServiceError):
    status, code, type, reason = 413, "payload_too_large", "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code, type, reason = 415, "unsupported_media_type", "invalid_request_error", "unsupported_media_type"


class ValidationFailed(ServiceError):
    status, code, type, reason = 422, "validation_error", "invalid_request_error", "invalid_request"


class QueueFull(ServiceError):
    status, code, type, reason = 429, "queue_full", "rate_limit_error", "queue_full"


class ServiceUnavailable(ServiceError):
    status, code, type, reason = 503, "unavailable", "server_error", "unavailable"


class DeadlineExceeded(ServiceError):
    status, code, type, reason = 504, "deadline_exceeded", "timeout_error", "timeout"


# The one mapping from the model store's errors to HTTP answers: the first class that matches wins, so
# subclasses come first. A route that means something else by a store error (a request naming a model that
# does not exist is a 422, not a 404) catches it itself; any other StoreError is an internal error (500).
STORE_ERRORS: tuple[tuple[type[Exception], type[ServiceError], str], ...] = (
    (store_errors.JobNotFound, NotFound, "job_not_found"),
    (store_errors.VersionNotFound, NotFound, "version_not_found"),
    (store_errors.NotFound, NotFound, "not_found"),
    (store_errors.Conflict, Conflict, "conversion_conflict"),  # every store Conflict is about a job
    (store_errors.InvalidName, ValidationFailed, "validation_error"),
    # A stored version whose files fail their checksums: it cannot be served, the current model keeps serving.
    (store_errors.ModelFilesError, Conflict, "version_corrupted"),
)


def from_store_error(exc: Exception) -> ServiceError | None:
    """The HTTP error for a model-store error (`STORE_ERRORS`), or None when it has none."""
    for store_class, http_class, code in STORE_ERRORS:
        if isinstance(exc, store_class):
            message = f"cannot be served: {exc}" if isinstance(exc, store_errors.ModelFilesError) else str(exc)
            return http_class(message, code=code)
    return None


class ClientDisconnected(Exception):
    """The client went away; nobody is left to answer, so this never becomes a response."""


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_body(
    *, code: str, message: str, type_: str, request_id: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type_, "param": param, "request_id": request_id}}


def error_response(request: Request, exc: ServiceError, *, count: bool = True) -> JSONResponse:
    """The error as a response; `count` adds it to `eas_requests_rejected_total` (probes opt out)."""
    if count and exc.reason is not None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.rejected.labels(reason=exc.reason).inc()
    body = error_body(code=exc.code, message=exc.message, type_=exc.type, request_id=request_id_of(request),
                      param=exc.param)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    body = error_body(code=code, message=message, type_="invalid_request_error",
                      request_id=request_id_of(request))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """A short human message (first few problems) and the first offending field, OpenAI's `param`."""
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header", "path")]
        where = ".".join(loc) or "request"
        param = param or (where if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation(list(exc.errors()))
    return error_response(request, ValidationFailed(message, param=param))


async def _store_error(request: Request, exc: Exception) -> Response:
    error = from_store_error(exc)
    return error_response(request, error) if error is not None else await _unexpected(request, exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps it apart from real errors in metrics.
    return Response(status_code=499)


async def _client_gone_mid_body(request: Request, exc: Exception) -> Response:
    """Starlette raises ClientDisconnect when the client hangs up while its body is being read. Left to
    the catch-all it became a logged 500 (twice: ours and uvicorn's traceback) and fed the 5xx rate."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(reason="client_disconnected").inc()
    return await _client_gone(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id_of(request)
    log.error("request %s failed", rid, exc_info=exc)
    body = error_body(code="internal_error", message="internal error; see the server log for this request id",
                      type_="server_error", request_id=rid)
    headers = {"X-Request-Id": rid} if rid else None
    return JSONResponse(body, status_code=500, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(store_errors.StoreError, _store_error)
    app.add_exception_handler(store_errors.ModelFilesError, _store_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(ClientDisconnect, _client_gone_mid_body)
    app.add_exception_handler(Exception, _unexpected)
