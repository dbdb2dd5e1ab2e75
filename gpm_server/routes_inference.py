"""POST /score and POST /compare: validate, check limits, batch, answer."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request

from gpm_server.deps import INFERENCE_DEPS, unless_disconnected
from gpm_server.errors import GPMError
from gpm_server.schemas import (
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
)
from gpm_server.service import Scorer, telemetry_batches

log = logging.getLogger(__name__)

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 500, 503)}
router = APIRouter(dependencies=INFERENCE_DEPS, responses=_ERRORS)  # type: ignore[arg-type]


def _scorer(request: Request) -> Scorer:
    return request.app.state.scorer


@router.post("/score", response_model=ScoreResponse, summary="Score groups of responses")
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Embeddings, eigenvalues, per-dimension group scores ŝ, rewards and (optionally) the
    G×G preference matrix for each group. With `run_id` and `step` the call also feeds the
    drift telemetry."""
    response, tensors = await unless_disconnected(request, _scorer(request).score(body))
    log.debug("scored %d groups (%d sequences)", len(body.groups), response.usage.sequences)
    telemetry = request.app.state.telemetry
    if telemetry is not None and body.run_id is not None and body.step is not None:
        key = request.headers.get("idempotency-key")
        await _record(telemetry, body.run_id, body.step, tensors, key)
    return response


async def _record(
    telemetry: object, run_id: str, step: int, tensors: list, key: str | None = None
) -> None:
    try:
        for i, batch in enumerate(telemetry_batches(tensors)):
            # A retried request (same Idempotency-Key) whose first attempt was stored but whose
            # answer was lost is not counted twice (TelemetryStore dedups by run_id + key).
            extra = {"request_key": f"{key}:{i}"} if key else {}
            await asyncio.to_thread(
                telemetry.record,  # type: ignore[attr-defined]
                run_id=run_id,
                step=step,
                **batch,
                **extra,
            )
    except Exception as exc:
        # The caller asked for telemetry: saying 200 would claim it was stored.
        log.exception("telemetry record failed for run %s step %d", run_id, step)
        raise GPMError(500, "telemetry_failed", "scores computed but telemetry not stored") from exc


@router.post("/compare", response_model=CompareResponse, summary="Compare response pairs")
async def compare(body: CompareRequest, request: Request) -> CompareResponse:
    """P(a ≻ b), the score s(a ≻ b) and its per-dimension parts λ_l s_l(a, b) per pair."""
    return await unless_disconnected(request, _scorer(request).compare(body))
