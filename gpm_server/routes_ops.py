"""Operational routes, all open: /health, /ready, /info, /metrics, /metrics/summary."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from gpm_server.dashboard_data import metrics_summary
from gpm_server.errors import not_ready
from gpm_server.metrics import CONTENT_TYPE
from gpm_server.schemas import ErrorResponse, HealthResponse, InfoResponse, ReadyResponse

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Liveness",
    responses={503: {"model": HealthResponse, "description": "The model failed to load."}},
)
async def health(request: Request) -> JSONResponse:
    """200 while the process serves (also while the model loads); 503 if loading failed."""
    failed = request.app.state.status == "failed"
    body = HealthResponse(status="failed" if failed else "ok")
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Readiness",
    responses={503: {"model": ReadyResponse, "description": "Loading, draining or failed."}},
)
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before, while draining and on failure."""
    status = request.app.state.status
    body = ReadyResponse(ready=status == "ready", status=status)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/info",
    response_model=InfoResponse,
    summary="Model and limits",
    responses={503: {"model": ErrorResponse, "description": "The model is still loading."}},
)
async def info(request: Request) -> InfoResponse:
    """Model id, revision, K, τ, gate, normalisation, dtype, device, limits. No secrets."""
    model = request.app.state.model
    if model is None:
        raise not_ready()
    s = request.app.state.settings
    i = model.info
    return InfoResponse(
        model=i.model_id,
        revision=i.revision,
        source_format=i.source_format,
        k=i.k,
        tau=i.tau,
        gated=i.gated,
        l2_normalize=i.l2_normalize,
        dtype=i.dtype,
        device=i.device,
        max_length=i.max_length,
        truncation=s.truncation,
        auth_required=s.api_key is not None,
        limits={
            "max_body_bytes": s.max_body_bytes,
            "max_groups_per_request": s.max_groups_per_request,
            "max_responses_per_group": s.max_responses_per_group,
            "max_pairs_per_request": s.max_pairs_per_request,
            "max_in_flight": s.max_in_flight,
        },
        batching={
            "max_batch_tokens": s.max_batch_tokens,
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": s.max_queue,
            "model_workers": s.model_workers,
        },
        version=request.app.state.version,
        extra=dict(i.extra),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/metrics/summary", summary="Load counters as JSON (for the dashboard)")
async def metrics_json(request: Request) -> dict:
    """The cumulative counters behind the dashboard's load panels (same data as /metrics)."""
    return metrics_summary(request.app.state.metrics.registry)
