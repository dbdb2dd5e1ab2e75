"""Old import path, kept for users: the code is `gprl_core.gpm_math`."""

from gprl_core.gpm_math import (
    DEFAULT_TAU,
    group_scores,
    l2_normalize,
    per_dimension_scores,
    preference_matrix,
    preference_probability,
    preference_score,
    split_pairs,
)

__all__ = [
    "DEFAULT_TAU",
    "group_scores",
    "l2_normalize",
    "per_dimension_scores",
    "preference_matrix",
    "preference_probability",
    "preference_score",
    "split_pairs",
]
