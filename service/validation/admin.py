"""The body of POST /admin/convert: the conversion parameters a submitter may choose.

It is ConversionRequest (eas/conversion/pipeline.py) less the fields the server owns (store location,
output directory, progress bar); every field keeps its type, default and description, so the OpenAPI
schema documents the conversion knobs. `activate` is kept: the server acts on it after the job succeeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from eas.conversion.pipeline import ConversionRequest

_SERVER_OWNED = frozenset({"store", "out", "show_progress_bar"})

ConvertBody: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ConvertBody",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Start a conversion of a stored model (see docs/conversion.md for every knob).",
    **{name: (field.annotation, field) for name, field in ConversionRequest.model_fields.items()
       if name not in _SERVER_OWNED},
)


def job_params(body: BaseModel, store_root: Path) -> dict[str, Any]:
    """Validate the whole request as the worker will (cross-field rules included) and return the
    parameters to store with the job: only what the submitter set, so equal bodies hash equally."""
    params = body.model_dump(mode="json", exclude_unset=True)
    ConversionRequest(store=store_root, **params)  # raises ValidationError → 422 before any work
    return {k: v for k, v in params.items() if k not in ("model", "version")}


__all__ = ["ConvertBody", "ValidationError", "job_params"]
