"""Old import path, kept for users: the code is `gprl_core.telemetry`."""

from gprl_core.telemetry import (
    FLOAT_K_FIELDS,
    INT_K_FIELDS,
    SCALAR_FLOAT_FIELDS,
    SCALAR_INT_FIELDS,
    RunTelemetry,
    StepStats,
    merge_by_key,
    merge_runs,
    stats_from_tensors,
)

__all__ = [
    "FLOAT_K_FIELDS",
    "INT_K_FIELDS",
    "SCALAR_FLOAT_FIELDS",
    "SCALAR_INT_FIELDS",
    "RunTelemetry",
    "StepStats",
    "merge_by_key",
    "merge_runs",
    "stats_from_tensors",
]
