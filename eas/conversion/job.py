"""What a conversion job may ask for: its ConversionRequest (eas/conversion/pipeline.py) less the fields the
server decides. The admin API's request body (service/admin/requests.py) and the worker process that runs a
stored job (service/admin/worker.py) both build a job's request here, so the rule is written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eas.conversion.pipeline import ConversionRequest

# The fields of ConversionRequest that the server decides for a job, never its submitter: where the result
# goes and how progress is shown. `activate` is the server's too: the worker never flips the active version;
# the server loads and warms the new version and only then marks it active (hot activation,
# service/admin/supervisor.py), so the store never names as active a version the server has not shown it can
# serve. The admin API's request body is ConversionRequest less these (service/admin/requests.py).
SERVER_FIELDS = frozenset({"store", "out", "show_progress_bar", "activate"})


def build_request(store_root: Path, fields: Mapping[str, Any]) -> ConversionRequest:
    """The ConversionRequest a job runs: `fields` (model, version and the submitter's conversion parameters)
    with the server-owned ones set by the server. The one validation of a job's parameters: the admin API
    runs it on a request before queueing the job, the worker on the stored job. Raises pydantic's
    ValidationError for bad parameters."""
    submitted = {k: v for k, v in fields.items() if k not in SERVER_FIELDS}
    return ConversionRequest(**submitted, store=store_root, show_progress_bar=False)
