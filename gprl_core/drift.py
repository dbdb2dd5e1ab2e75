"""GPRL drift monitor and controller: watch the per-axis variance spectrum, correct on the fly.

One import path for the three parts (arXiv 2605.18721 §3, docs/math.md §3, docs/learner.md):
- `gprl_core.drift_config`: `DriftConfig`, the "paper" and "project" rule presets;
- `gprl_core.drift_monitor`: α(t), α(0), D(t), the over-exploited axis;
- `gprl_core.drift_controller`: m, β, ε from the monitor's state.
"""

from gprl_core.drift_config import PRESETS, RULES, DriftConfig, drift_config
from gprl_core.drift_controller import (
    ControlState,
    DriftController,
    NoOpDriftController,
    project_weights,
)
from gprl_core.drift_monitor import DriftMonitor, MonitorState, kl_divergence

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
