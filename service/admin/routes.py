"""Admin API: conversion jobs, model imports and versions (serving-conventions §6, §7).

Every route needs the admin bearer token (403 while none is configured, 401 with a wrong one). Jobs are
rows in the model store, run by worker processes (service/admin/supervisor.py); activation loads and
warms a version beside the current one and swaps atomically (service/admin/activation.py). The store's
errors become HTTP errors through one table (service/errors.py STORE_ERRORS); a route catches one itself
only where it means something else there (a body naming an unknown model is a 422, not a 404).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from eas.conversion.data import EASY_VQA
from eas.conversion.pipeline import ConversionRequest
from eas.manifest import ModelFilesError
from eas.model.checkpoint import CheckpointError, CheckpointInfo, check_checkpoint
from model_store import JobRecord, ModelStore, VersionInfo
from model_store import errors as store_errors
from model_store.versions import is_valid_name
from service.admin.activation import Activator
from service.admin.requests import ACTIVATE, ConvertBody, ImportBody, parse_conversion
from service.admin.supervisor import JobSupervisor
from service.deps import ServiceDep, require_admin_token
from service.errors import ServiceUnavailable, UnsupportedMediaType, ValidationFailed
from service.lifecycle import run_in_daemon_thread
from service.openapi import standalone_schema
from service.settings import Settings
from service.validation.requests import is_json, media_type, read_json, validate_model

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_token)])


class AdminState:
    """What the admin routes need, created at startup when an admin token is configured."""

    def __init__(self, store: ModelStore, supervisor: JobSupervisor, activator: Activator) -> None:
        self.store, self.supervisor, self.activator = store, supervisor, activator


async def get_admin(request: Request) -> AdminState:
    admin: AdminState | None = getattr(request.app.state, "admin", None)
    if admin is None:
        raise ServiceUnavailable("the admin API is starting", code="not_ready", headers={"Retry-After": "1"})
    return admin


AdminDep = Annotated[AdminState, Depends(get_admin)]


def job_view(job: JobRecord) -> dict[str, Any]:
    view = job.to_dict()
    view["links"] = {"self": f"/admin/jobs/{job.id}"}
    return view


def _unprocessable(message: str, param: str | None = None) -> ValidationFailed:
    return ValidationFailed(message, param=param)


UPLOADS = "uploads"  # <store>/uploads: a dataset root on every server


def dataset_roots(store: ModelStore, settings: Settings) -> list[Path]:
    return [(Path(store.root) / UPLOADS).resolve(), *(Path(root).resolve() for root in settings.dataset_roots)]


def _under_roots(path: Path, roots: list[Path]) -> bool:
    """Inside one of the roots once resolved (symlinks and `..` followed), so a job reads no other file."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def _allowed_dataset(dataset: str, roots: list[Path]) -> bool:
    path = Path(dataset)
    return path.is_absolute() and _under_roots(path, roots)


def _check_source(store: ModelStore, request: ConversionRequest, roots: list[Path] | None = None) -> str:
    """The source version (resolved), or 422 naming the field; no work is started for a bad request.

    A dataset file must lie under a configured root (issue 17): checked before the file is looked at, and
    answered with one message whether or not it exists, so the route is no existence oracle."""
    try:
        info = store.conversion_source(request.model, request.version)
    except store_errors.NotFound as exc:  # named in the body: the request is wrong, not the URL
        raise _unprocessable(str(exc), "model" if request.version is None else "version") from exc
    if info.kind == "converted":
        raise _unprocessable(f"{info.ref} is already converted; convert its baseline instead", "version")
    if request.dataset != EASY_VQA:
        if roots is not None and not _allowed_dataset(request.dataset, roots):
            raise _unprocessable("dataset must be 'easy-vqa' or a JSONL file under a dataset root: the store's "
                                 f"'{UPLOADS}' directory or one of EAS_DATASET_ROOTS", "dataset")
        if not Path(request.dataset).is_file():
            raise _unprocessable("dataset is neither 'easy-vqa' nor a readable JSONL file", "dataset")
        if roots is not None and (outside := _rows_outside_roots(Path(request.dataset), roots)):
            shown = ", ".join(str(n) for n in outside[:5]) + (" …" if len(outside) > 5 else "")
            raise _unprocessable(f"dataset rows name images outside the dataset roots (lines {shown}); a job reads "
                                 "images only under the store's uploads directory or EAS_DATASET_ROOTS", "dataset")
    return info.version


def _rows_outside_roots(dataset: Path, roots: list[Path]) -> list[int]:
    """Line numbers of rows whose image path (relative ones against the file's folder) resolves outside
    every root. Decided from the path alone, before the job looks at the image, so a job's row errors
    ('not found' vs 'unreadable') never reveal anything about files outside the roots. Rows that are not
    JSON objects with a string image are left to the job's own row checks (eas/conversion/data.py)."""
    outside: list[int] = []
    with dataset.open("r", encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            image = row.get("image") if isinstance(row, dict) else None
            if not isinstance(image, str) or not image.strip():
                continue
            if not _under_roots(dataset.parent / image.strip(), roots):  # an absolute image replaces the folder
                outside.append(number)
    return outside


# The body is read in the handler, not declared as a parameter: FastAPI parses declared bodies before it
# runs any dependency, so a closed admin API answered malformed JSON with 422 instead of 403/401.
_CONVERT_BODY = {"content": {"application/json": {"schema": standalone_schema(ConvertBody)}}, "required": True}


@router.post("/convert", status_code=202, openapi_extra={"requestBody": _CONVERT_BODY})
async def start_conversion(
    request: Request,
    response: Response,
    admin: AdminDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> dict[str, Any]:
    """Queue a conversion job: 202 with its id and a Location header; 409 while one runs for the model."""
    media = media_type(request)
    if media and not is_json(media):
        raise UnsupportedMediaType("Content-Type must be application/json")
    conversion = parse_conversion(await read_json(request), admin.store.root)
    roots = dataset_roots(admin.store, request.app.state.settings)
    version = await run_in_daemon_thread(_check_source, admin.store, conversion.request, roots)
    job = await run_in_daemon_thread(lambda: admin.store.jobs.create(
        conversion.request.model, version, conversion.params, idempotency_key=idempotency_key,
        activate=bool(conversion.params.get(ACTIVATE))))
    admin.supervisor.submit()
    response.headers["Location"] = f"/admin/jobs/{job.id}"
    return job_view(job)


@router.get("/jobs")
async def list_jobs(
    admin: AdminDep,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # SQLite integers are 64-bit: larger ones were a 500
) -> dict[str, Any]:
    # Every store call runs off the event loop (issue 17, M4): a writer holding the database lock must
    # not freeze the server, /health/live included.
    jobs = await run_in_daemon_thread(partial(admin.store.jobs.select, status, model=model, limit=limit,
                                              offset=offset))
    total = await run_in_daemon_thread(partial(admin.store.jobs.count, status, model=model))
    return {"jobs": [job_view(j) for j in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, admin: AdminDep) -> dict[str, Any]:
    return job_view(await run_in_daemon_thread(admin.store.jobs.get, job_id))


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, admin: AdminDep, response: Response) -> dict[str, Any]:
    """Cancel cooperatively (idempotent): a queued job is cancelled at once, a running one at its next
    check (202); a finished job is returned unchanged (200)."""
    job = await run_in_daemon_thread(admin.supervisor.cancel, job_id)
    if not job.finished:
        response.status_code = 202
    return job_view(job)


@router.get("/models")
async def list_models(admin: AdminDep, service: ServiceDep) -> dict[str, Any]:
    models = await run_in_daemon_thread(_list_models, admin.store)
    served = [{"variant": s.variant, "model": s.info.model, "version": s.info.version}
              for s in service.registry.all()]
    default = await run_in_daemon_thread(admin.store.default_model)
    return {"models": models, "default": default, "served": served}


def _list_models(store: ModelStore) -> list[dict[str, Any]]:
    models = []
    for name in store.list_models():
        versions = [v.to_dict() for v in store.list_versions(name)]
        active = next((v["version"] for v in versions if v["active"]), None)
        models.append({"name": name, "active": active, "versions": versions})
    return models


_IMPORT_BODY = {"content": {"application/json": {"schema": standalone_schema(ImportBody)}}, "required": True}


def _import_checkpoint(store: ModelStore, name: str, path: Path) -> tuple[VersionInfo, CheckpointInfo]:
    """Check the directory (eas.model.checkpoint), then copy it in as a baseline version; 422 naming the
    problem otherwise, with nothing written."""
    try:
        checked = check_checkpoint(path)
    except CheckpointError as exc:
        raise _unprocessable(str(exc), "path") from exc
    metadata = {"source": "import", "imported_from": str(path), **checked.to_metadata()}
    try:
        info = store.import_directory(name, path, kind="baseline", metadata=metadata)
    except ModelFilesError as exc:  # the directory's own checksum manifest does not match its files
        raise _unprocessable(str(exc), "path") from exc
    except store_errors.InvalidName as exc:
        raise _unprocessable(str(exc), "name") from exc
    return info, checked


@router.post("/models/{name}/versions", status_code=201, openapi_extra={"requestBody": _IMPORT_BODY})
async def import_version(name: str, request: Request, admin: AdminDep, service: ServiceDep) -> dict[str, Any]:
    """Import a checkpoint directory on the server as the next baseline version of `name` (201), after the
    same checks as `eas import`; with `"activate": true`, hot-activate it. A directory that is missing, of
    an unsupported class, without a processor or with unreadable weights → 422 naming the problem."""
    media = media_type(request)
    if media and not is_json(media):
        raise UnsupportedMediaType("Content-Type must be application/json")
    body: Any = validate_model(ImportBody, await read_json(request))
    if not is_valid_name(name):
        raise _unprocessable(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (not starting "
                             "with '.')", "name")
    path = Path(body.path)
    if not path.is_absolute():
        raise _unprocessable(f"path {body.path!r} must be absolute (a directory on the server)", "path")
    if body.activate:
        service.check_can_activate()  # allowed after a failed load: the way out
    info, checked = await run_in_daemon_thread(_import_checkpoint, admin.store, name, path)
    view: dict[str, Any] = {"version": info.to_dict(), "checkpoint": checked.to_metadata(),
                            "links": {"activate": f"/admin/models/{name}/versions/{info.version}/activate"}}
    if body.activate:
        view["serving"] = await _activate(admin, name, info.version)
    return view


async def _activate(admin: AdminState, name: str, version: str) -> list[dict[str, str]]:
    infos = await admin.activator.activate(name, version)  # unknown: 404; corrupted: 409 (STORE_ERRORS)
    return [{"variant": i.variant, "model": i.model, "version": i.version} for i in infos]


@router.post("/models/{name}/versions/{version}/activate")
async def activate_version(name: str, version: str, admin: AdminDep, service: ServiceDep) -> dict[str, Any]:
    """Load and warm the version beside the current one, swap atomically, then mark it active.
    A missing or corrupted version is refused and the current model keeps serving."""
    service.check_can_activate()  # allowed after a failed load: the way out
    return {"activated": f"{name}:{version}", "serving": await _activate(admin, name, version)}
