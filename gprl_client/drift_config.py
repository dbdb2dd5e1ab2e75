"""Old import path, kept for users: the code is `gprl_core.drift_config`."""

from gprl_core.drift_config import (
    PRESETS,
    RULES,
    DriftConfig,
    Rule,
    drift_config,
)

__all__ = [
    "PRESETS",
    "RULES",
    "DriftConfig",
    "Rule",
    "drift_config",
]
