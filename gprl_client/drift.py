"""GPRL drift monitor and controller: watch the per-axis variance spectrum, correct on the fly.

Source: GPRL (arXiv 2605.18721), docs/math.md §3; shaped like OpenRLHF's
`trainer/ppo_utils/kl_controller.py` (a controller with a tiny `update` and a fixed twin).
The paper publishes no thresholds, step sizes or decay rates: every knob is in `DriftConfig`
with a default justified in docs/learner.md.

    α_l(t)  ∝ mean over groups of Var_i(λ_l ŝ_l(i))       share of axis l, Σ_l α_l = 1
    ᾱ(t)    = (1 − r) ᾱ(t−1) + r α(t)                      EMA of the shares (rate r)
    α(0)    = mean of α over the first `baseline_steps` steps
    D(t)    = KL(ᾱ(t) ‖ α(0)) = Σ_l ᾱ_l log(ᾱ_l / α_l(0))
    v̄(t), v(0)                                             the same EMA and baseline of the
                                                           absolute variances (not shares)
    g_l(t)  = v̄_l(t) / v_l(0)                              growth of axis l's own spread
    l*      = argmax_l g_l(t)                              the over-exploited axis

Why two signals: D sees the spectrum tilt, but any progress tilts it (an axis the policy has
solved loses spread, so the others gain share without anyone exploiting them). Exploitation is
the policy pushing one axis without end, which makes *that* axis's within-group spread grow
against its own baseline; convergence only shrinks spreads. So a correction needs both D(t) > τ_D
and g_l*(t) ≥ `growth_threshold` (docs/learner.md). `growth_threshold=0` is the share rule
alone (l* by growth instead of by ᾱ_l/α_l(0); these nearly always agree: ᾱ_l/α_l(0) ≈ g_l times a
factor common to all axes).

τ_D is `threshold`, raised to `noise_multiplier` × the noise floor (the D(t) expected without
drift, estimated from the spread of the shares during the baseline) when the batch is too small
for a fixed threshold.

Controller, once per step: if D(t) > τ_D and g_l* ≥ growth_threshold, m_l* −= η and every
other m_l += η/(K−1), then m is projected onto {mean(m) = 1, m_min ≤ m ≤ m_max}; β moves a
fraction of the way up to β_max and the PPO clip ε a fraction of the way down to ε_min. Otherwise
m, β, ε decay toward their baselines (1, β_0, ε_0) by the factor exp(−decay_rate). Pure Python
floats: deterministic, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from gprl_client.advantages import axis_variance

Floats = Sequence[float] | torch.Tensor


@dataclass(frozen=True)
class DriftConfig:
    """Every knob of the drift monitor and controller (defaults: see docs/learner.md)."""

    ema_rate: float = 0.1  # r: weight of the newest step in the EMA of the shares (~10 steps)
    baseline_steps: int = 20  # steps averaged into the baseline α(0); no control before
    threshold: float = 0.02  # τ_D on D(t) = KL(ᾱ(t) ‖ α(0)) (nats)
    noise_multiplier: float = 10.0  # τ_D ≥ this × the noise floor measured in the baseline (0: off)
    growth_threshold: float = 2.0  # l*'s spread must reach this × its baseline to act (0: off)
    kl_eps: float = 1e-8  # floor on shares inside the KL (an axis with zero variance)
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

    def __post_init__(self) -> None:
        checks = {
            "0 < ema_rate <= 1": 0 < self.ema_rate <= 1,
            "baseline_steps >= 1": self.baseline_steps >= 1,
            "threshold > 0": self.threshold > 0,
            "noise_multiplier >= 0": self.noise_multiplier >= 0,
            "growth_threshold >= 0": self.growth_threshold >= 0,
            "kl_eps > 0": self.kl_eps > 0,
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


def _floats(x: Floats, k: int, name: str) -> list[float]:
    values = torch.as_tensor(x, dtype=torch.float64).reshape(-1).tolist()
    if len(values) != k:
        raise ValueError(f"{name} must have {k} entries, got {len(values)}")
    return values


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def kl_divergence(p: Sequence[float], q: Sequence[float], eps: float = 1e-8) -> float:
    """KL(p ‖ q) in nats for two distributions over K axes, each floored at eps and renormalised."""
    p = [max(v, eps) for v in p]
    q = [max(v, eps) for v in q]
    sp, sq = sum(p), sum(q)
    return sum(pi / sp * math.log((pi / sp) / (qi / sq)) for pi, qi in zip(p, q, strict=True))


@dataclass(frozen=True)
class MonitorState:
    """Snapshot of the monitor after a step. Tuples have K entries; `drift` is NaN until ready."""

    step: int = 0  # accepted updates so far
    skipped: int = 0  # updates ignored (no finite, positive variance to share out)
    alpha: tuple[float, ...] | None = None  # ᾱ(t), the EMA of the shares
    baseline: tuple[float, ...] | None = None  # α(0), set once `baseline_steps` steps are in
    baseline_sum: tuple[float, ...] | None = None  # running sums of the shares and of their
    baseline_sumsq: tuple[float, ...] | None = None  # squares while the baseline is built
    noise_floor: float = math.nan  # predicted E[D] without drift, from the baseline's spread
    drift: float = math.nan  # D(t)
    ratio: tuple[float, ...] | None = None  # ᾱ_l(t) / α_l(0)
    over_exploited: int | None = None  # l* = argmax growth
    variance: tuple[float, ...] | None = None  # v̄(t), the EMA of the absolute variances
    variance_baseline: tuple[float, ...] | None = None  # v(0)
    variance_baseline_sum: tuple[float, ...] | None = None  # running sums while it is built
    growth: tuple[float, ...] | None = None  # g_l(t) = v̄_l(t) / v_l(0)

    @property
    def ready(self) -> bool:
        return self.baseline is not None

    def log_dict(self, prefix: str = "drift/") -> dict[str, float]:
        """Flat floats for a logger: D, the noise floor, per axis ᾱ_l, α_l(0), ratio, growth."""
        out = {
            f"{prefix}D": self.drift,
            f"{prefix}noise_floor": self.noise_floor,
            f"{prefix}step": float(self.step),
        }
        for name, values in (
            ("alpha", self.alpha),
            ("alpha0", self.baseline),
            ("ratio", self.ratio),
            ("var", self.variance),
            ("growth", self.growth),
        ):
            for i, v in enumerate(values or ()):
                out[f"{prefix}{name}_{i}"] = v
        return out


def _add(total: Sequence[float] | None, x: list[float]) -> list[float]:
    return list(x) if total is None else [a + b for a, b in zip(total, x, strict=True)]


def _baseline_update(
    s: MonitorState, share: list[float], step: int, config: DriftConfig
) -> dict[str, Any]:
    """Baseline fields after one more accepted step: running sums until `baseline_steps`, then
    α(0) = their mean and the noise floor, frozen for the rest of the run.

    Noise floor: if the per-step shares scatter with variance V_l around α_l, the EMA deviates
    with variance r/(2−r)·V_l and α(0) with V_l/B, so E[D] ≈ ½ (r/(2−r) + 1/B) Σ_l V_l / α_l(0)
    (KL ≈ half a χ² for small deviations); V_l is the baseline's sample variance (ddof = 1).
    """
    if s.baseline is not None:
        return {"baseline": s.baseline, "noise_floor": s.noise_floor}
    acc = _add(s.baseline_sum, share)
    acc2 = _add(s.baseline_sumsq, [x * x for x in share])
    if step < config.baseline_steps:
        return {"baseline_sum": tuple(acc), "baseline_sumsq": tuple(acc2)}
    mean = [a / step for a in acc]
    var = [max(a2 - step * m * m, 0.0) / max(step - 1, 1) for a2, m in zip(acc2, mean, strict=True)]
    r = config.ema_rate
    spread = sum(v / max(m, config.kl_eps) for v, m in zip(var, mean, strict=True))
    return {"baseline": tuple(mean), "noise_floor": 0.5 * (r / (2 - r) + 1 / step) * spread}


def _variance_update(
    s: MonitorState, var: list[float], step: int, config: DriftConfig
) -> dict[str, Any]:
    """Absolute-variance fields after one more accepted step: the EMA v̄(t), the baseline v(0)
    (mean of the first `baseline_steps` steps, then frozen) and the growth g = v̄ / v(0).

    An axis with no spread in the baseline is compared with kl_eps × the baseline's total, so
    spread appearing from nothing counts as (large) growth instead of dividing by zero.
    """
    r = config.ema_rate
    old = var if s.variance is None else s.variance
    ema = [(1 - r) * a + r * x for a, x in zip(old, var, strict=True)]
    out: dict[str, Any] = {"variance": tuple(ema)}
    base = s.variance_baseline
    if base is None:
        acc = _add(s.variance_baseline_sum, var)
        if step < config.baseline_steps:
            return {**out, "variance_baseline_sum": tuple(acc)}
        base = tuple(a / step for a in acc)
    floor = config.kl_eps * sum(base)
    growth = tuple(v / max(b, floor) for v, b in zip(ema, base, strict=True))
    return {**out, "variance_baseline": base, "growth": growth}


class DriftMonitor:
    """EMA of the per-axis variance shares α(t), baseline α(0), D(t) = KL(ᾱ(t) ‖ α(0)); the
    same EMA and baseline of the absolute variances, and each axis's growth g_l(t)."""

    def __init__(self, k: int, config: DriftConfig | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.config = config or DriftConfig()
        self.state = MonitorState()

    def update(self, mean_axis_variance: Floats) -> MonitorState:
        """One training step from the mean over groups of Var_i(λ_l ŝ_l(i)), `[K]`.

        A step whose variances are not all finite, or sum to zero, carries no share information:
        it is counted in `skipped` and changes nothing else. Tiny negative values (round-off in
        sums of squares) are clamped to 0.
        """
        var = _floats(mean_axis_variance, self.k, "mean_axis_variance")
        total = sum(max(v, 0.0) for v in var)
        s = self.state
        if not all(math.isfinite(v) for v in var) or total <= 0:
            self.state = replace(s, skipped=s.skipped + 1)
            return self.state
        var = [max(v, 0.0) for v in var]
        share = [v / total for v in var]
        r = self.config.ema_rate
        if s.alpha is None:
            alpha = share
        else:
            alpha = [(1 - r) * a + r * x for a, x in zip(s.alpha, share, strict=True)]
        step = s.step + 1
        base = _baseline_update(s, share, step, self.config)
        spread = _variance_update(s, var, step, self.config)
        baseline, growth = base.get("baseline"), spread.get("growth")
        drift, ratio, worst = math.nan, None, None
        if baseline is not None and growth is not None:
            drift = kl_divergence(alpha, baseline, self.config.kl_eps)
            floor = self.config.kl_eps
            ratio = tuple(a / max(b, floor) for a, b in zip(alpha, baseline, strict=True))
            worst = max(range(self.k), key=growth.__getitem__)
        self.state = MonitorState(
            step=step,
            skipped=s.skipped,
            alpha=tuple(alpha),
            **base,
            drift=drift,
            ratio=ratio,
            over_exploited=worst,
            **spread,
        )
        return self.state

    update_from_axis_variance = update

    def update_from_group_scores(
        self, group_scores: torch.Tensor, eigenvalues: torch.Tensor | None = None
    ) -> MonitorState:
        """One step from local ŝ `[N, G, K]` and λ `[N, K]` (NaN = unscored, skipped)."""
        return self.update(torch.nanmean(axis_variance(group_scores, eigenvalues), dim=0))

    def update_from_variance_sums(self, sum_within_var: Floats, n_groups: Floats) -> MonitorState:
        """One step from service telemetry: Σ over groups of Var_i(λ_l ŝ_l) `[K]` and the number
        of groups `[K]` (gprl_client.telemetry.StepStats `sum_within_var`, `n_groups`, merged over
        replicas). Equals `update_from_group_scores` on the same data."""
        sums = _floats(sum_within_var, self.k, "sum_within_var")
        counts = _floats(n_groups, self.k, "n_groups")
        return self.update(
            [s / c if c > 0 else math.nan for s, c in zip(sums, counts, strict=True)]
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (NaN stored as None)."""
        out = asdict(self.state)
        out["drift"] = _nan_to_none(self.state.drift)
        out["noise_floor"] = _nan_to_none(self.state.noise_floor)
        return {"k": self.k, "state": out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"state is for k={state['k']}, this monitor has k={self.k}")
        s = dict(state["state"])
        tuples = ("alpha", "baseline", "baseline_sum", "baseline_sumsq", "ratio", "variance")
        tuples += ("variance_baseline", "variance_baseline_sum", "growth")
        for name in tuples:
            s[name] = None if s.get(name) is None else tuple(float(v) for v in s[name])
        for name in ("drift", "noise_floor"):
            s[name] = math.nan if s[name] is None else float(s[name])
        self.state = MonitorState(**s)


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
        """The correction rule: D(t) > τ_D and g_l*(t) ≥ growth_threshold (both after the
        baseline). A tilt with no growing axis is progress (a solved axis), not exploitation."""
        d, tau, g = monitor_state.drift, self.threshold(monitor_state), self.growth(monitor_state)
        return monitor_state.ready and d > tau and g >= self.config.growth_threshold

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (NaN stored as None)."""
        out = asdict(self.state)
        out["drift"] = _nan_to_none(self.state.drift)
        out["threshold"] = _nan_to_none(self.state.threshold)
        out["growth"] = _nan_to_none(self.state.growth)
        return {"k": self.k, "state": out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"state is for k={state['k']}, this controller has k={self.k}")
        s = dict(state["state"])
        s["weights"] = tuple(float(w) for w in s["weights"])
        for name in ("drift", "threshold", "growth"):
            s[name] = math.nan if s.get(name) is None else float(s[name])
        self.state = ControlState(**s)


class DriftController(_ControllerBase):
    """GPRL's drift controller (arXiv 2605.18721 §3; rule in the module docstring).

    `update(monitor_state)` once per training step, then read `weights`, `beta`, `clip_eps`.
    Nothing happens before the monitor's baseline is ready (D is undefined there); a tilt of the
    shares acts only when the over-exploited axis's own spread has grown (`triggered`). A step the
    monitor skipped (no scores) hands back its previous state, which counts as one more step here.
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
