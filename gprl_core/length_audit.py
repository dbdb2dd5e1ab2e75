"""Which verifier axes pay for answer length: measured on groups of sampled answers, before
training, so a prior against them can act from the first step (`DriftConfig.axis_prior`).

Why: on a real LM the drift controllers did not find the length axis in time (docs/gprl_runs.md,
"Where the issue's targets stand"): an exploit that saturates shrinks the axis's spread, and a
correction after the monitor's baseline came too late. Switching a known length axis off from the
first step was the one configuration that held length down. This module names such axes from
data instead of by construction.

    r_l(x)  = Pearson correlation over group x's scored answers of λ_l ŝ_l(i) and n_i (tokens)
    r̄_l     = mean of r_l over the groups where both vary; ± 1.96 · sd / √groups
    α_l     = mean over groups of Var_i(λ_l ŝ_l) / Σ_l' (same): the axis's share of the spread
    flagged = axes with r̄_l ≥ threshold and r̄_l − ci > 0, in at least `min_groups` groups

`prior_weights(k, flagged)` is then the m that switches them off (0) with the rest equal and
mean(m) = 1. Pure torch; no I/O (`gprl audit-length` is the command).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gprl_core.advantages import axis_variance

DEFAULT_THRESHOLD = 0.7  # r² ≈ 0.5: length explains about half of the axis's within-group spread


def prior_weights(k: int, drop: Sequence[int]) -> list[float]:
    """m with the axes in `drop` at 0 and the others equal, mean(m) = 1."""
    dropped = set(drop)
    if k < 2 or not dropped or not all(0 <= a < k for a in dropped) or len(dropped) >= k:
        raise ValueError(
            f"need k >= 2 and between 1 and k - 1 distinct axes in 0..k-1 to drop, got k={k}, "
            f"drop={list(drop)}"
        )
    keep = k / (k - len(dropped))
    return [0.0 if i in dropped else keep for i in range(k)]


def within_group_corr(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """`[N, G]`, `[N, G]` → `[N]` Pearson correlation per row over the entries where both are
    finite (padding and unscored answers are NaN); NaN where fewer than 2 or either is flat."""
    x, n = x.double(), n.double()
    ok = torch.isfinite(x) & torch.isfinite(n)
    cnt = ok.sum(1, keepdim=True).clamp_min(1)
    x0, n0 = torch.where(ok, x, 0.0), torch.where(ok, n, 0.0)
    dx = torch.where(ok, x0 - x0.sum(1, keepdim=True) / cnt, 0.0)
    dn = torch.where(ok, n0 - n0.sum(1, keepdim=True) / cnt, 0.0)
    sx, sn = dx.pow(2).sum(1).sqrt(), dn.pow(2).sum(1).sqrt()
    scale = x0.abs().amax(1).clamp_min(1e-300)
    flat = (sx <= 1e-12 * scale) | (sn == 0) | (ok.sum(1) < 2)
    r = (dx * dn).sum(1) / (sx * sn).clamp_min(1e-300)
    return torch.where(flat, torch.full_like(r, math.nan), r)


@dataclass
class AxisLength:
    axis: int
    corr: float  # r̄_l (NaN with no usable group)
    ci95: float  # half-width of the 95% interval over groups (NaN with fewer than 2)
    groups: int  # groups where both the axis term and the token counts vary
    share: float  # α_l, the axis's share of the within-group spread
    mean_eigenvalue: float


@dataclass
class LengthAudit:
    axes: list[AxisLength]
    threshold: float
    min_groups: int
    groups: int
    flagged: list[int] = field(default_factory=list)
    prior: list[float] | None = None  # prior_weights(k, flagged); None if none or all flagged
    share_dropped: float = 0.0  # Σ α_l over the flagged axes: the spread a prior gives up

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and math.isnan(v) else v

        return {
            "threshold": self.threshold,
            "min_groups": self.min_groups,
            "groups": self.groups,
            "axes": [{k: clean(v) for k, v in vars(a).items()} for a in self.axes],
            "flagged": self.flagged,
            "prior": self.prior,
            "share_dropped": self.share_dropped,
        }


def length_audit(
    group_scores: torch.Tensor,
    eigenvalues: torch.Tensor | None,
    tokens: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    min_groups: int = 4,
) -> LengthAudit:
    """`[N, G, K]` ŝ (NaN where unscored), `[N, K]` λ (None: 1), `[N, G]` token counts (NaN or
    negative where padded) → the audit in the module docstring."""
    if group_scores.dim() != 3:
        raise ValueError(f"group_scores must be [N, G, K], got {tuple(group_scores.shape)}")
    n_groups, g, k = group_scores.shape
    if tokens.shape != (n_groups, g):
        raise ValueError(f"tokens must be [N, G] = {(n_groups, g)}, got {tuple(tokens.shape)}")
    if not -1 < threshold <= 1 or min_groups < 1:
        raise ValueError(
            f"need -1 < threshold <= 1 and min_groups >= 1, got {threshold}, {min_groups}"
        )
    s = group_scores.double()
    lam = torch.ones(n_groups, k, dtype=s.dtype) if eigenvalues is None else eigenvalues.double()
    if lam.shape != (n_groups, k):
        raise ValueError(f"eigenvalues must be [N, K] = {(n_groups, k)}, got {tuple(lam.shape)}")
    term = s * lam.unsqueeze(1)
    n = tokens.double()
    n = torch.where(n >= 0, n, math.nan)
    var = torch.nanmean(axis_variance(s, lam), dim=0)  # [K]; NaN-aware over groups
    total = float(torch.nansum(var))
    axes = []
    for axis in range(k):
        r = within_group_corr(term[..., axis], n)
        r = r[~torch.isnan(r)]
        used = int(r.numel())
        mean = float(r.mean()) if used else math.nan
        ci = 1.96 * float(r.std(correction=1)) / math.sqrt(used) if used >= 2 else math.nan
        share = float(var[axis]) / total if total > 0 and not math.isnan(float(var[axis])) else 0.0
        axes.append(AxisLength(axis, mean, ci, used, share, float(lam[:, axis].mean())))
    flagged = [
        a.axis
        for a in axes
        if a.groups >= min_groups and a.corr >= threshold and a.corr - a.ci95 > 0
    ]
    prior = prior_weights(k, flagged) if 0 < len(flagged) < k else None
    dropped = sum(axes[a].share for a in flagged)
    return LengthAudit(axes, threshold, min_groups, n_groups, flagged, prior, dropped)
