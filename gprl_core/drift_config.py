"""The drift monitor's and controller's knobs (`DriftConfig`) and the two rule presets.

Two rules (docs/learner.md, "Two rules"):

- `rule="paper"`: GPRL as written (arXiv 2605.18721 §3, docs/math.md §3). The over-exploited axis
  is l* = argmax_l ᾱ_l(t)/α_l(0); a correction fires whenever D(t) > τ_D (a fixed `threshold`);
  m, β, ε decay back to their baselines once D(t) ≤ τ_D again. No growth gate, no noise floor.
- `rule="project"`: our variant. l* = argmax_l g_l(t), the growth of axis l's own within-group
  spread against its baseline; a correction needs D(t) > τ_D *and* g_l* ≥ `growth_threshold`,
  with τ_D raised to `noise_multiplier` × the noise floor; any step that does not correct decays.

`drift_config("paper")` / `drift_config("project")` give each rule with its own defaults;
keyword arguments override single knobs. Pure Python: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Rule = Literal["project", "paper"]
RULES: tuple[str, ...] = ("project", "paper")


@dataclass(frozen=True)
class DriftConfig:
    """Every knob of the drift monitor and controller (defaults: see docs/learner.md)."""

    rule: str = "project"  # "project" or "paper" (module docstring)
    ema_rate: float = 0.1  # r: weight of the newest step in the EMA of the shares (~10 steps)
    baseline_steps: int = 20  # steps averaged into the baseline α(0); no control before
    threshold: float = 0.02  # τ_D on D(t) = KL(ᾱ(t) ‖ α(0)) (nats)
    noise_multiplier: float = 10.0  # τ_D ≥ this × the noise floor measured in the baseline (0: off)
    growth_threshold: float = 2.0  # l*'s spread must reach this × its baseline to act (0: off)
    kl_eps: float = 1e-8  # floor on shares inside the KL (an axis with zero variance)
    # [project option] axes whose baseline share α_l(0) is below this are never l*: a ratio or a
    # growth of an axis that carries ~nothing is noise over noise. 0 (both presets): every axis.
    min_baseline_share: float = 0.0
    weight_step: float = 0.05  # η: weight moved off l* per drifting step
    weight_min: float = 0.5  # bounds on every m_l (must bracket 1)
    weight_max: float = 1.5
    beta: float = 0.01  # β_0: the trainer's KL coefficient, the baseline
    beta_max: float = 0.1  # upper bound on β
    beta_rate: float = 0.1  # fraction of the gap β_max − β closed per drifting step
    clip_eps: float = 0.2  # ε_0: the trainer's PPO clip, the baseline
    clip_eps_min: float = 0.1  # lower bound on ε
    clip_rate: float = 0.1  # fraction of the gap ε − ε_min closed per drifting step
    decay_rate: float = 0.05  # per quiet step, deviations shrink by exp(−decay_rate)
    # Fixed per-axis factors on m from the first step (scaled to mean 1), e.g. 0 on an axis that
    # pays for length (`gprl audit-length`); the controller's m multiplies them. None: all 1.
    axis_prior: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.axis_prior is not None:
            object.__setattr__(self, "axis_prior", _scaled_prior(self.axis_prior))
        checks = {
            f"rule in {RULES}": self.rule in RULES,
            "0 < ema_rate <= 1": 0 < self.ema_rate <= 1,
            "baseline_steps >= 1": self.baseline_steps >= 1,
            "threshold > 0": self.threshold > 0,
            "noise_multiplier >= 0": self.noise_multiplier >= 0,
            "growth_threshold >= 0": self.growth_threshold >= 0,
            "kl_eps > 0": self.kl_eps > 0,
            "0 <= min_baseline_share < 1": 0 <= self.min_baseline_share < 1,
            "weight_step >= 0": self.weight_step >= 0,
            "0 <= weight_min <= 1 <= weight_max": 0 <= self.weight_min <= 1 <= self.weight_max,
            "0 <= beta <= beta_max": 0 <= self.beta <= self.beta_max,
            "0 <= clip_eps_min <= clip_eps": 0 <= self.clip_eps_min <= self.clip_eps,
            "0 <= beta_rate, clip_rate <= 1": 0 <= self.beta_rate <= 1 and 0 <= self.clip_rate <= 1,
            "decay_rate >= 0": self.decay_rate >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid DriftConfig: {', '.join(failed)}")
        if self.rule == "paper" and (self.growth_threshold or self.noise_multiplier):
            raise ValueError(
                "invalid DriftConfig: rule='paper' has a fixed τ_D and no growth gate, so "
                "growth_threshold and noise_multiplier must be 0 (use drift_config('paper'))"
            )

    def prior_for(self, k: int) -> tuple[float, ...] | None:
        """`axis_prior` checked against a verifier's K (None when there is no prior)."""
        if self.axis_prior is not None and len(self.axis_prior) != k:
            raise ValueError(f"axis_prior has {len(self.axis_prior)} factors but K={k}")
        return self.axis_prior


def _scaled_prior(prior: Any) -> tuple[float, ...]:
    """`axis_prior` as a tuple scaled to mean 1 (a list from a JSON checkpoint is accepted)."""
    try:
        values = tuple(float(v) for v in prior)
    except (TypeError, ValueError):
        raise ValueError(
            f"invalid DriftConfig: axis_prior must be numbers, got {prior!r}"
        ) from None
    if len(values) < 2 or not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise ValueError(
            "invalid DriftConfig: axis_prior needs one finite factor >= 0 per axis (K >= 2), "
            f"not all 0, got {list(values)}"
        )
    mean = sum(values) / len(values)
    return tuple(v / mean for v in values)


# The knobs each rule sets; everything else keeps DriftConfig's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "project": {},
    "paper": {"rule": "paper", "growth_threshold": 0.0, "noise_multiplier": 0.0},
}


def drift_config(preset: str = "project", **overrides: Any) -> DriftConfig:
    """`DriftConfig` for a rule preset ("project" or "paper"), with single knobs overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown drift preset {preset!r}: choose one of {sorted(PRESETS)}")
    return DriftConfig(**{**PRESETS[preset], **overrides})
