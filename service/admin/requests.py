"""Bodies of the admin routes that take one.

POST /admin/models/{name}/versions (`ImportBody`): a server-side directory to import as a baseline version.

POST /admin/convert: the conversion parameters a submitter may choose, i.e. ConversionRequest
(eas/conversion/pipeline.py) less the fields the server owns (`SERVER_FIELDS`, eas/conversion/job.py), plus
`activate`, which the server acts on after the job succeeds (service/admin/supervisor.py). The body is
validated once, by the worker's own `build_request`, before the job is queued (`parse_conversion`);
`ConvertBody` is its OpenAPI schema, generated from the same fields so that it documents every knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from eas.conversion.job import SERVER_FIELDS, build_request
from eas.conversion.pipeline import ConversionRequest
from service.errors import ValidationFailed, describe_validation

ACTIVATE = "activate"  # the one server-owned field a submitter may set: a wish, acted on by the server
_ACTIVATE_FIELD = Field(False, description="Hot-activate the new version after the job succeeds (load, warm, "
                                           "swap), as POST /admin/models/{name}/versions/{version}/activate does.")
_TARGET = ("model", "version")  # stored in the job's own columns, not in its params

ConvertBody: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ConvertBody",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Start a conversion of a stored model (see docs/conversion.md for every knob).",
    **{name: (field.annotation, field) for name, field in ConversionRequest.model_fields.items()
       if name not in SERVER_FIELDS},
    **{ACTIVATE: (bool, _ACTIVATE_FIELD)},
)


@dataclass(frozen=True)
class Conversion:
    """A validated POST /admin/convert body."""

    request: ConversionRequest  # what the worker will run (model and source version as asked)
    params: dict[str, Any]  # what the job stores: the fields the submitter set, normalised, `activate` included


def parse_conversion(body: Any, store_root: Path) -> Conversion:
    """Validate a conversion body as the worker will (cross-field rules included); `ValidationFailed` (422)
    naming the first problem otherwise. Only what the submitter set is stored, so equal bodies hash equally."""
    if not isinstance(body, dict):
        raise ValidationFailed("the body must be a JSON object of conversion parameters")
    owned = sorted(set(body) & SERVER_FIELDS - {ACTIVATE})
    if owned:
        raise ValidationFailed(f"{owned[0]}: set by the server for every job, not by its submitter", param=owned[0])
    try:
        activate = TypeAdapter(bool).validate_python(body.get(ACTIVATE, False))
    except ValidationError as exc:
        raise ValidationFailed(f"{ACTIVATE}: {exc.errors()[0]['msg']}", param=ACTIVATE) from None
    try:
        request = build_request(store_root, body)
    except ValidationError as exc:
        message, param = describe_validation(list(exc.errors()))
        raise ValidationFailed(f"invalid conversion parameters: {message}", param=param) from None
    chosen = set(body) - set(_TARGET) - {ACTIVATE}
    params = request.model_dump(mode="json", include=chosen, exclude_unset=True)
    if ACTIVATE in body:
        params[ACTIVATE] = activate
    return Conversion(request, params)


class ImportBody(BaseModel):
    """Import a `save_pretrained` directory on the server's filesystem as the next baseline version of the
    model named in the URL (see docs/admin.md)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096,
                      description="Absolute path of the checkpoint directory, as the server process sees it.")
    activate: bool = Field(False, description="Hot-activate the new version after the import (load, warm, swap), "
                                              "as POST /admin/models/{name}/versions/{version}/activate does.")


__all__ = ["ACTIVATE", "Conversion", "ConvertBody", "ImportBody", "parse_conversion"]
