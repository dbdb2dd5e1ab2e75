"""`GET /telemetry` and `GET /telemetry/runs`: drift telemetry recorded from tagged /score calls.

Both need the API key when one is set (like every inference route) but not a loaded model: a
learner can read what was recorded while a replica warms up or drains. The store is blocking
SQLite, so the handlers are plain `def` (FastAPI runs them in its thread pool).

Each replica answers with its own sums. `?by_key=true` splits them: `steps` then holds only the
records stored without an `Idempotency-Key`, and `records` lists every keyed record, so that
`GPMClient.telemetry` can ask every replica and count a record that two replicas stored (a retry
that failed over) once (`gprl_core.telemetry.merge_by_key`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from gpm_server.dashboard_data import drift_series
from gpm_server.deps import require_api_key
from gpm_server.errors import GPMError
from gpm_server.schemas import (
    MAX_STEP,
    DriftSeriesResponse,
    ErrorResponse,
    TelemetryResponse,
    TelemetryRunsResponse,
)
from gpm_server.telemetry_store import TelemetryStore
from gprl_core.drift_config import DriftConfig, drift_config

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


@router.get("/telemetry", response_model=TelemetryResponse, response_model_exclude_none=True)
def get_telemetry(
    request: Request,
    run_id: str = Query(min_length=1, max_length=256, description="The run's id."),
    since_step: int = Query(0, ge=0, le=MAX_STEP, description="Only steps >= since_step."),
    by_key: bool = Query(
        False, description="Keyed records apart (`records`), for a merge across replicas."
    ),
) -> dict:
    """Per-step, per-axis mergeable statistics of one run (empty `steps` for an unknown run)."""
    store = _store(request)
    if by_key:
        return store.query_by_key(run_id, since_step).to_dict()
    return store.query(run_id, since_step).to_dict()


@router.get("/telemetry/runs", response_model=TelemetryRunsResponse)
def list_telemetry_runs(request: Request) -> dict:
    """Every run with recorded telemetry on this replica."""
    return {"runs": _store(request).list_runs()}


@router.get("/telemetry/drift", response_model=DriftSeriesResponse)
def get_drift_series(
    request: Request,
    run_id: str = Query(min_length=1, max_length=256, description="The run's id."),
    preset: str | None = Query(
        None,
        description="Drift rule preset: project | paper (default: config's rule, else project).",
    ),
    config: str | None = Query(
        None,
        max_length=4096,
        description="JSON object of `DriftConfig` fields to override on the preset, e.g. the "
        "learner's `drift_loop.state_dict()['config']`, so the replay uses the run's own knobs.",
    ),
) -> dict:
    """α(t), D(t), τ_D, per-axis variance and a replay of the drift controller (m, β, ε,
    corrections) under `preset` + `config` (default: the project preset's defaults), over this
    replica's stored steps of one run.

    The learner's own controller state is not sent to the service: see gpm_server/dashboard_data.py
    for when the replay and the learner differ. Empty series for an unknown run.
    """
    run, replay = _store(request).query(run_id), replay_config(preset, config)
    try:
        return drift_series(run, replay)
    except ValueError as e:  # a config that does not fit the run (axis_prior's length)
        raise GPMError(422, "invalid_config", str(e)) from None


def replay_config(preset: str | None, config: str | None) -> DriftConfig:
    """The replay's `DriftConfig`, or a 422 that says which part of the query is wrong."""
    overrides: Any = {}
    if config:
        try:
            overrides = json.loads(config)
        except json.JSONDecodeError as e:
            raise GPMError(422, "invalid_config", f"config is not JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise GPMError(
                422, "invalid_config", "config must be a JSON object of DriftConfig fields"
            )
    known = {f.name for f in fields(DriftConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise GPMError(422, "invalid_config", f"unknown DriftConfig fields {unknown}")
    rule = overrides.pop("rule", None)
    if preset and rule and preset != rule:
        raise GPMError(422, "invalid_config", f"preset {preset!r} but config's rule is {rule!r}")
    preset = preset or rule or "project"
    try:
        return drift_config(preset, **overrides)
    except (TypeError, ValueError) as e:
        raise GPMError(422, "invalid_config", str(e)) from None
