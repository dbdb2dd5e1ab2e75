"""The drift controller: per-axis weights m, KL coefficient β and PPO clip ε from D(t).

Source: GPRL (arXiv 2605.18721 §3, docs/math.md §3); shaped like OpenRLHF's
`trainer/ppo_utils/kl_controller.py` (a controller with a tiny `update` and a fixed twin).

Once per step, with l* the monitor's over-exploited axis (gprl_core/drift_monitor.py):

    correct:  m_l* −= η, every other m_l += η/(K−1), then m is projected onto
              {mean(m) = 1, m_min ≤ m ≤ m_max}; β += β_rate (β_max − β); ε −= ε_rate (ε − ε_min)
    decay:    m → 1, β → β_0, ε → ε_0 by the factor exp(−decay_rate) per step

When each happens depends on `DriftConfig.rule`:
- "paper": correct iff D(t) > τ_D (τ_D = `threshold`), decay once D(t) ≤ τ_D;
- "project": correct iff D(t) > τ_D and g_l*(t) ≥ `growth_threshold`, with τ_D raised to
  `noise_multiplier` × the monitor's noise floor; decay on every other step.
Nothing happens before the monitor's baseline is ready (D is undefined there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from gprl_core.drift_config import DriftConfig
from gprl_core.drift_monitor import MonitorState, _from_json, _to_json


def project_weights(weights: Sequence[float], lo: float, hi: float) -> list[float]:
    """Euclidean projection onto {lo ≤ m_l ≤ hi, mean(m) = 1} (needs lo ≤ 1 ≤ hi).

    The projection is clip(m + s, lo, hi) for the shift s that makes the mean 1; the mean is
    monotone in s, so s is found by bisection (K is small, 100 halvings reach float precision).
    """
    k = len(weights)

    def mean_at(s: float) -> float:
        return sum(min(max(w + s, lo), hi) for w in weights) / k

    left, right = lo - max(weights), hi - min(weights)  # mean is lo at left, hi at right
    for _ in range(100):
        mid = 0.5 * (left + right)
        if mean_at(mid) < 1.0:
            left = mid
        else:
            right = mid
    return [min(max(w + 0.5 * (left + right), lo), hi) for w in weights]


@dataclass(frozen=True)
class ControlState:
    """The controller's runtime state: per-axis weights m `[K]`, KL coefficient β, PPO clip ε."""

    weights: tuple[float, ...]
    beta: float
    clip_eps: float
    active: bool = False  # was the last update a correction (D > τ_D)?
    corrections: int = 0  # drifting steps so far
    drift: float = math.nan  # D(t) seen at the last update
    threshold: float = math.nan  # the τ_D it was compared with (NaN before the baseline)
    growth: float = math.nan  # g_l*(t) seen at the last update (compared with growth_threshold)

    def log_dict(self, prefix: str = "drift/") -> dict[str, float]:
        out = {
            f"{prefix}beta": self.beta,
            f"{prefix}clip_eps": self.clip_eps,
            f"{prefix}active": float(self.active),
            f"{prefix}corrections": float(self.corrections),
            f"{prefix}threshold": self.threshold,
            f"{prefix}growth_max": self.growth,
        }
        out.update({f"{prefix}m_{i}": m for i, m in enumerate(self.weights)})
        return out


class _ControllerBase:
    """Shared plumbing: config, state, tensor view of the weights, JSON state round-trip."""

    def __init__(self, k: int, config: DriftConfig | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.config = config or DriftConfig()
        self.state = self.baseline_state()

    def baseline_state(self) -> ControlState:
        return ControlState(
            weights=(1.0,) * self.k, beta=self.config.beta, clip_eps=self.config.clip_eps
        )

    @property
    def weights(self) -> torch.Tensor:
        """`[K]` float32: the m_l to pass to `gprl_advantages(..., weights=...)`."""
        return torch.tensor(self.state.weights, dtype=torch.float32)

    @property
    def beta(self) -> float:
        return self.state.beta

    @property
    def clip_eps(self) -> float:
        return self.state.clip_eps

    def threshold(self, monitor_state: MonitorState) -> float:
        """τ_D, raised to `noise_multiplier` × the monitor's noise floor when that is larger."""
        if not monitor_state.ready:
            return math.nan
        floor = monitor_state.noise_floor
        if self.config.noise_multiplier > 0 and math.isfinite(floor):
            return max(self.config.threshold, self.config.noise_multiplier * floor)
        return self.config.threshold

    @staticmethod
    def growth(monitor_state: MonitorState) -> float:
        """g_l*(t), the growth of the over-exploited axis's spread (NaN before the baseline)."""
        g, worst = monitor_state.growth, monitor_state.over_exploited
        return math.nan if g is None or worst is None else g[worst]

    def triggered(self, monitor_state: MonitorState) -> bool:
        """The correction rule (module docstring): D(t) > τ_D, and for the project rule also
        g_l*(t) ≥ growth_threshold (a tilt with no growing axis is progress, not exploitation)."""
        if not monitor_state.ready:
            return False
        d, tau = monitor_state.drift, self.threshold(monitor_state)
        if self.config.rule == "paper":
            return d > tau
        return d > tau and self.growth(monitor_state) >= self.config.growth_threshold

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (NaN stored as None)."""
        return {"k": self.k, "state": _to_json(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"state is for k={state['k']}, this controller has k={self.k}")
        self.state = ControlState(**_from_json(ControlState, state["state"]))


class DriftController(_ControllerBase):
    """GPRL's drift controller (arXiv 2605.18721 §3; rules in the module docstring).

    `update(monitor_state)` once per training step, then read `weights`, `beta`, `clip_eps`.
    A step the monitor skipped (no scores) hands back its previous state, which counts as one
    more step here.
    """

    def update(self, monitor_state: MonitorState) -> ControlState:
        s, c = self.state, self.config
        d, tau, g = monitor_state.drift, self.threshold(monitor_state), self.growth(monitor_state)
        if self.triggered(monitor_state) and monitor_state.over_exploited is not None:
            worst = monitor_state.over_exploited
            m = list(s.weights)
            if self.k > 1:
                lift = c.weight_step / (self.k - 1)
                m = [w - c.weight_step if i == worst else w + lift for i, w in enumerate(m)]
                m = project_weights(m, c.weight_min, c.weight_max)
            self.state = ControlState(
                weights=tuple(m),
                beta=s.beta + c.beta_rate * (c.beta_max - s.beta),
                clip_eps=s.clip_eps - c.clip_rate * (s.clip_eps - c.clip_eps_min),
                active=True,
                corrections=s.corrections + 1,
                drift=d,
                threshold=tau,
                growth=g,
            )
        else:
            f = math.exp(-c.decay_rate)
            self.state = ControlState(
                weights=tuple(1.0 + (w - 1.0) * f for w in s.weights),
                beta=c.beta + (s.beta - c.beta) * f,
                clip_eps=c.clip_eps + (s.clip_eps - c.clip_eps) * f,
                active=False,
                corrections=s.corrections,
                drift=d,
                threshold=tau,
                growth=g,
            )
        return self.state


class NoOpDriftController(_ControllerBase):
    """The controller switched off: same interface, m = 1, β = β_0, ε = ε_0 forever."""

    def update(self, monitor_state: MonitorState) -> ControlState:
        tau, g = self.threshold(monitor_state), self.growth(monitor_state)
        self.state = replace(self.state, drift=monitor_state.drift, threshold=tau, growth=g)
        return self.state
