"""Old import path, kept for users: the code is `gprl_core.advantages`."""

from gprl_core.advantages import (
    DEFAULT_DDOF,
    DEFAULT_EPS,
    GPRLAdvantages,
    Normalization,
    axis_variance,
    gpm_scalar_reward,
    gprl_advantages,
    scalar_grpo_advantages,
)

__all__ = [
    "DEFAULT_DDOF",
    "DEFAULT_EPS",
    "GPRLAdvantages",
    "Normalization",
    "axis_variance",
    "gpm_scalar_reward",
    "gprl_advantages",
    "scalar_grpo_advantages",
]
