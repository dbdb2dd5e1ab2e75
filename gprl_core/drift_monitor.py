"""The drift monitor: the per-axis variance spectrum α(t), its baseline α(0) and D(t).

Source: GPRL (arXiv 2605.18721), docs/math.md §3.

    α_l(t)  ∝ mean over groups of Var_i(λ_l ŝ_l(i))       share of axis l, Σ_l α_l = 1
    ᾱ(t)    = (1 − r) ᾱ(t−1) + r α(t)                      EMA of the shares (rate r)
    α(0)    = mean of α over the first `baseline_steps` steps
    D(t)    = KL(ᾱ(t) ‖ α(0)) = Σ_l ᾱ_l log(ᾱ_l / α_l(0))
    ρ_l(t)  = ᾱ_l(t) / α_l(0)                              the paper's over-exploitation ratio
    v̄(t), v(0)                                             the same EMA and baseline of the
                                                           absolute variances (not shares)
    g_l(t)  = v̄_l(t) / v_l(0)                              growth of axis l's own spread
    l*      = argmax_l ρ_l(t)   (rule "paper")
            = argmax_l g_l(t)   (rule "project")
              over the axes with α_l(0) ≥ `min_baseline_share` (0 by default: all axes)

Why the project rule looks at growth: D sees the spectrum tilt, but any progress tilts it (an
axis the policy has solved loses spread, so the others gain share without anyone exploiting
them). ρ_l ≈ g_l times a factor common to all axes, so both rules nearly always pick the same l*;
they differ in when they act (gprl_core/drift_controller.py). Pure Python floats: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from gprl_core.advantages import axis_variance
from gprl_core.drift_config import DriftConfig

Floats = Sequence[float] | torch.Tensor


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


def _to_json(state: Any) -> dict[str, Any]:
    """`asdict(state)` with every NaN float stored as None (JSON has no NaN)."""
    return {k: _nan_to_none(v) if isinstance(v, float) else v for k, v in asdict(state).items()}


def _from_json(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the frozen dataclass `cls` from its `asdict` saved as JSON:
    lists back to tuples of floats, None back to NaN for float fields (read from the fields'
    declared types, so a new field needs no change here)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in saved:
            continue
        v, kind = saved[f.name], str(f.type)
        if kind.startswith("tuple"):
            out[f.name] = None if v is None else tuple(float(x) for x in v)
        elif kind == "float":
            out[f.name] = math.nan if v is None else float(v)
        else:
            out[f.name] = v
    return out


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
    over_exploited: int | None = None  # l*: argmax ratio (paper) or argmax growth (project)
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
            f"{prefix}over_exploited": math.nan
            if self.over_exploited is None
            else float(self.over_exploited),
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


def deviation_variance_factor(ema_rate: float, baseline_steps: int) -> float:
    """Var(EMA of a noisy per-step quantity − its mean over `baseline_steps` steps) per unit of
    the per-step variance: r/(2−r) for the EMA (rate r) plus 1/B for the baseline mean."""
    return ema_rate / (2 - ema_rate) + 1 / baseline_steps


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
    spread = sum(v / max(m, config.kl_eps) for v, m in zip(var, mean, strict=True))
    factor = deviation_variance_factor(config.ema_rate, step)
    return {"baseline": tuple(mean), "noise_floor": 0.5 * factor * spread}


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
            by = ratio if self.config.rule == "paper" else growth
            floor_share = self.config.min_baseline_share
            candidates = [i for i in range(self.k) if baseline[i] >= floor_share] or range(self.k)
            worst = max(candidates, key=by.__getitem__)
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
        of groups `[K]` (gprl_core.telemetry.StepStats `sum_within_var`, `n_groups`, merged over
        replicas). Equals `update_from_group_scores` on the same data."""
        sums = _floats(sum_within_var, self.k, "sum_within_var")
        counts = _floats(n_groups, self.k, "n_groups")
        return self.update(
            [s / c if c > 0 else math.nan for s, c in zip(sums, counts, strict=True)]
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (NaN stored as None)."""
        return {"k": self.k, "state": _to_json(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"state is for k={state['k']}, this monitor has k={self.k}")
        self.state = MonitorState(**_from_json(MonitorState, state["state"]))
