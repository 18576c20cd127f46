"""`GET /metrics` in Prometheus text format; behind the inference token when one is configured
(serving-conventions §7: metrics are protected or on a separate port)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.deps import MetricsDep, require_api_token
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_api_token)])


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}}})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE)
