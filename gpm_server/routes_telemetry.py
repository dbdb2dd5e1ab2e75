"""`GET /telemetry` and `GET /telemetry/runs`: drift telemetry recorded from tagged /score calls.

Both need the API key when one is set (like every inference route) but not a loaded model: a
learner can read what was recorded while a replica warms up or drains. The store is blocking
SQLite, so the handlers are plain `def` (FastAPI runs them in its thread pool).

Each replica answers with its own sums; `GPMClient.telemetry` asks every replica and adds them
(`gprl_client.telemetry.merge_runs`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from gpm_server.dashboard_data import drift_series
from gpm_server.deps import require_api_key
from gpm_server.errors import GPMError
from gpm_server.schemas import MAX_STEP, ErrorResponse
from gpm_server.telemetry_store import TelemetryStore


class TelemetryStep(BaseModel):
    """Sums and counts of one step (all lists have length K); see gprl_client/telemetry.py."""

    step: int
    k: int
    n_groups: list[int] = Field(description="Groups with a within-group variance on axis l.")
    sum_x: list[float] = Field(description="Σ over scored responses of x_l = λ_l·ŝ_l.")
    sum_x2: list[float] = Field(description="Σ x_l².")
    sum_within_var: list[float] = Field(
        description="Σ over groups of Var_i(x_l(i)) (ddof 0): ÷ n_groups is the drift statistic."
    )
    sum_eigenvalues: list[float] = Field(description="Σ over groups of λ_l.")
    sum_len_x: list[float] = Field(description="Σ response_tokens · x_l.")
    n_responses: int = Field(description="Scored responses.")
    n_eig_groups: int = Field(description="Groups counted in sum_eigenvalues.")
    sum_len: float = Field(description="Σ response_tokens over scored responses.")
    sum_len2: float = Field(description="Σ response_tokens².")


class TelemetryResponse(BaseModel):
    run_id: str
    steps: list[TelemetryStep]


class TelemetryRun(BaseModel):
    run_id: str
    k: int
    steps: int
    first_step: int
    last_step: int
    records: int = Field(description="Tagged /score calls recorded.")


class TelemetryRunsResponse(BaseModel):
    runs: list[TelemetryRun]


Series = list[float | None]


class DriftSeriesResponse(BaseModel):
    """Column-major series over the run's T stored steps (per-axis fields: K lists of T)."""

    run_id: str
    k: int
    config: dict[str, float | int] = Field(description="The DriftConfig of the replay.")
    steps: list[int]
    variance: list[Series] = Field(description="Mean within-group variance of λ_l·ŝ_l.")
    alpha: list[Series] = Field(description="ᾱ_l(t), the EMA of the variance shares.")
    growth: list[Series] = Field(description="g_l(t), an axis's spread against its baseline.")
    weights: list[Series] = Field(description="m_l after the step (replayed controller).")
    drift: Series = Field(description="D(t) = KL(ᾱ(t) ‖ α(0)); null before the baseline.")
    threshold: Series = Field(description="τ_D the controller compared D with.")
    beta: Series
    clip_eps: Series
    active: list[bool] = Field(description="The replayed controller corrected at this step.")
    corrections: list[int] = Field(description="Corrections so far (cumulative).")
    over_exploited: list[int | None] = Field(description="l*, the axis with the largest growth.")
    n_responses: list[int]
    baseline: Series | None = Field(description="α(0) once the baseline steps are in.")


_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 422)}
router = APIRouter(
    tags=["telemetry"],
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,  # type: ignore[arg-type]
)


def _store(request: Request) -> TelemetryStore:
    store = getattr(request.app.state, "telemetry", None)
    if store is None:
        raise GPMError(404, "telemetry_disabled", "this service does not record telemetry")
    return store


@router.get("/telemetry", response_model=TelemetryResponse)
def get_telemetry(
    request: Request,
    run_id: str = Query(min_length=1, max_length=256, description="The run's id."),
    since_step: int = Query(0, ge=0, le=MAX_STEP, description="Only steps >= since_step."),
) -> dict:
    """Per-step, per-axis mergeable statistics of one run (empty `steps` for an unknown run)."""
    return _store(request).query(run_id, since_step).to_dict()


@router.get("/telemetry/runs", response_model=TelemetryRunsResponse)
def list_telemetry_runs(request: Request) -> dict:
    """Every run with recorded telemetry on this replica."""
    return {"runs": _store(request).list_runs()}


@router.get("/telemetry/drift", response_model=DriftSeriesResponse)
def get_drift_series(
    request: Request,
    run_id: str = Query(min_length=1, max_length=256, description="The run's id."),
) -> dict:
    """α(t), D(t), τ_D, per-axis variance and a replay of the drift controller (m, β, ε,
    corrections) under the default `DriftConfig`, over this replica's stored steps of one run.

    The learner's own controller state is not sent to the service: see gpm_server/dashboard_data.py
    for when the replay and the learner differ. Empty series for an unknown run.
    """
    return drift_series(_store(request).query(run_id))
