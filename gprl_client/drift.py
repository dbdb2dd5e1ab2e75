"""Old import path, kept for users: the code is `gprl_core.drift`."""

from gprl_core.drift import (
    PRESETS,
    RULES,
    ControlState,
    DriftConfig,
    DriftController,
    DriftMonitor,
    MonitorState,
    NoOpDriftController,
    drift_config,
    kl_divergence,
    project_weights,
)

__all__ = [
    "PRESETS",
    "RULES",
    "ControlState",
    "DriftConfig",
    "DriftController",
    "DriftMonitor",
    "MonitorState",
    "NoOpDriftController",
    "drift_config",
    "kl_divergence",
    "project_weights",
]
