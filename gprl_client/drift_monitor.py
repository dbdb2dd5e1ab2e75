"""Old import path, kept for users: the code is `gprl_core.drift_monitor`."""

from gprl_core.drift_monitor import (
    DriftMonitor,
    Floats,
    MonitorState,
    deviation_variance_factor,
    kl_divergence,
)

__all__ = [
    "DriftMonitor",
    "Floats",
    "MonitorState",
    "deviation_variance_factor",
    "kl_divergence",
]
