"""Old import path, kept for users: the code is `gprl_core.drift_controller`."""

from gprl_core.drift_controller import (
    ControlState,
    DriftController,
    NoOpDriftController,
    project_weights,
)

__all__ = [
    "ControlState",
    "DriftController",
    "NoOpDriftController",
    "project_weights",
]
