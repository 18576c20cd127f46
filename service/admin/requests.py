"""Bodies of the admin routes that take one.

POST /admin/models/{name}/versions (`ImportBody`): a server-side directory to import as a baseline version.

POST /admin/convert (`ConvertBody`): the conversion parameters a submitter may choose. It is ConversionRequest
(eas/conversion/pipeline.py) less the fields the server owns (store location, output directory, progress bar);
every field keeps its type, default and description, so the OpenAPI schema documents the conversion knobs.
`activate` is kept: the server acts on it after the job succeeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from eas.conversion.pipeline import ConversionRequest

_SERVER_OWNED = frozenset({"store", "out", "show_progress_bar"})

ConvertBody: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ConvertBody",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Start a conversion of a stored model (see docs/conversion.md for every knob).",
    **{name: (field.annotation, field) for name, field in ConversionRequest.model_fields.items()
       if name not in _SERVER_OWNED},
)


class ImportBody(BaseModel):
    """Import a `save_pretrained` directory on the server's filesystem as the next baseline version of the
    model named in the URL (see docs/admin.md)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096,
                      description="Absolute path of the checkpoint directory, as the server process sees it.")
    activate: bool = Field(False, description="Hot-activate the new version after the import (load, warm, swap), "
                                              "as POST /admin/models/{name}/versions/{version}/activate does.")


def job_params(body: BaseModel, store_root: Path) -> dict[str, Any]:
    """Validate the whole request as the worker will (cross-field rules included) and return the
    parameters to store with the job: only what the submitter set, so equal bodies hash equally."""
    params = body.model_dump(mode="json", exclude_unset=True)
    ConversionRequest(store=store_root, **params)  # raises ValidationError → 422 before any work
    return {k: v for k, v in params.items() if k not in ("model", "version")}


__all__ = ["ConvertBody", "ImportBody", "ValidationError", "job_params"]
