"""GPRL advantages: per-dimension group-relative normalisation of GPM group scores.

Source: GPRL (arXiv 2605.18721), see docs/math.md §2. Letters: N groups (prompts), G responses
per group, K preference subspaces, D = 2K embedding width.

    ŝ_l(i)  = 1/(G'−1) Σ_{j≠i} s_l(i, j)                     (gpm_math.group_scores, O(N·G·K))
    Â_l(i)  = (ŝ_l(i) − μ_l) / σ_l      per group, per axis; 0 when σ_l is ~0 (see below)
    Â(i)    = Σ_l m_l · λ_l(x) · Â_l(i)                        (eigenvalues AFTER normalisation)

Conventions, chosen on purpose:

- ddof = 0. The G' valid responses of a group are the whole set being ranked, not a sample from
  which a population std is estimated. With ddof = 0 the normalised values have exactly unit
  variance and obey Samuelson's bound |Â_l(i)| ≤ √(G'−1), so the advantage is bounded without
  any additive ε. It also matches `axis_variance` (the drift statistic) and the service's
  mergeable sum / sum-of-squares telemetry. (TRL uses ddof = 1; the two differ by the factor
  √((G'−1)/G'), which varies between groups when some responses are unscored.)
- No additive ε in the denominator. An additive ε (TRL 1e-4, OpenRLHF 1e-9) breaks the exact
  invariance to a factor common to the group (λ_l, 1/τ, the embedding scale) and the exact K = 1
  equality with GRPO, and silently shrinks the advantages of low-spread groups. Instead `eps` is a
  *relative* zero-variance threshold: axis l of a group counts as flat, and gets Â_l = 0, when
  σ_l ≤ eps · S_l with S_l = 2 · mean_i|a_l(i)| · mean_j|b_l(j)| the magnitude of the terms that
  cancel in ŝ_l (so round-off from identical embeddings is caught at any scale). Default 1e-5:
  about 80 float32 ulps; genuine spreads that small are below the precision of a bf16 GPM anyway.
- μ_l is 0 analytically but the numerical mean over valid responses is subtracted anyway.
- NaN embeddings (unscored responses) are left out of every group statistic (ŝ is computed over
  the valid responses only) and get advantage 0; groups with fewer than two valid responses get 0.

Pure torch: no I/O, no HTTP, no trainer imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gprl_core.gpm_math import DEFAULT_TAU, split_pairs
from gprl_core.gpm_math import group_scores as _group_scores

DEFAULT_EPS = 1e-5
DEFAULT_DDOF = 0
Normalization = Literal["per_dimension", "global"]


@dataclass(frozen=True)
class GPRLAdvantages:
    """Result of `gprl_advantages` (all tensors on the input's device, float32 or float64).

    advantages    [N, G]  Â(i) = Σ_l m_l λ_l Â_l(i); 0 for unscored responses and dead groups.
    group_scores  [N, G, K]  ŝ_l(i) before normalisation; NaN where unscored or G' < 2.
    normalized    [N, G, K]  Â_l(i); 0 where unscored, G' < 2 or the axis is flat. In both modes
                  advantages = Σ_l m_l λ_l normalized_l; with normalization="global" the divisor
                  is the group's σ of the aggregate instead of the axis's own σ_l.
    valid         [N, G]  bool: the response was scored (finite embedding and eigenvalues).
    group_std     [N, K]  σ_l of ŝ_l over the valid responses (ddof as given); NaN if G' < 2.
    flat          [N, K]  bool: axis l of group n counted as zero-variance (Â_l = 0).
    axis_variance [N, K]  Var_i(λ_l ŝ_l(i)), ddof = 0: the drift monitor's statistic; NaN if G' < 2.
    valid_count   [N]     G', the number of scored responses per group.
    """

    advantages: torch.Tensor
    group_scores: torch.Tensor
    normalized: torch.Tensor
    valid: torch.Tensor
    group_std: torch.Tensor
    flat: torch.Tensor
    axis_variance: torch.Tensor
    valid_count: torch.Tensor

    @property
    def mean_axis_variance(self) -> torch.Tensor:
        """`[K]`: mean over live groups of `axis_variance`, the input of `DriftMonitor.update`."""
        return torch.nanmean(self.axis_variance, dim=0)

    def log_dict(self, prefix: str = "adv/") -> dict[str, float]:
        """Flat floats for a logger, per axis l over the live groups (G' ≥ 2): mean |Â_l| over
        valid responses, mean σ_l, mean Var(λ_l ŝ_l), the fraction of flat groups; plus the
        fraction of unscored responses."""
        live = self.valid_count >= 2
        mask = (self.valid & live.unsqueeze(-1)).unsqueeze(-1)
        mean_abs = (self.normalized.abs() * mask).sum(dim=(0, 1)) / mask.sum().clamp_min(1)
        flat = self.flat[live].float().mean(0)  # NaN when no group is live
        out = {f"{prefix}unscored_frac": float(1 - self.valid.float().mean())}
        per_axis = {
            "mean_abs_norm": mean_abs,
            "mean_group_std": torch.nanmean(self.group_std, dim=0),
            "mean_axis_var": self.mean_axis_variance,
            "flat_frac": flat,
        }
        for name, values in per_axis.items():
            out.update({f"{prefix}{name}_{i}": float(v) for i, v in enumerate(values.tolist())})
        return out


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _masked_moments(
    x: torch.Tensor, mask: torch.Tensor, dim: int, ddof: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, std (with ddof) and count of `x` over `dim` where `mask`; NaN where count ≤ ddof."""
    count = mask.sum(dim=dim, keepdim=True).to(x.dtype)
    x0 = torch.where(mask, x, torch.zeros_like(x))
    mean = x0.sum(dim=dim, keepdim=True) / count.clamp_min(1)
    dev = torch.where(mask, x - mean, torch.zeros_like(x))
    var = (dev * dev).sum(dim=dim, keepdim=True) / (count - ddof).clamp_min(1)
    var = torch.where(count > ddof, var, torch.full_like(var, float("nan")))
    return mean, var.sqrt(), count


def axis_variance(
    group_scores: torch.Tensor, eigenvalues: torch.Tensor | None = None
) -> torch.Tensor:
    """Within-group variance of λ_l·ŝ_l, ddof = 0, NaN-aware: `[N, G, K]`, `[N, K]` → `[N, K]`.

        V_l(n) = 1/G' Σ_{i valid} (λ_l ŝ_l(i) − mean_i λ_l ŝ_l)²

    Entries that are NaN in `group_scores` are left out; groups with fewer than two valid entries
    on an axis give NaN (so `torch.nanmean` over groups skips them). This is the drift monitor's
    statistic on *pre-normalisation* scores (normalised advantages have unit variance by
    construction); the service telemetry computes the same quantity from mergeable sums.
    `eigenvalues=None` means an ungated GPM (λ_l = 1).
    """
    if group_scores.dim() != 3:
        raise ValueError(f"group_scores must be [N, G, K], got {tuple(group_scores.shape)}")
    x = group_scores.to(_work_dtype(group_scores))
    if eigenvalues is not None:
        if eigenvalues.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"eigenvalues must be [N, K], got {tuple(eigenvalues.shape)}")
        x = x * eigenvalues.to(x.dtype).unsqueeze(1)
    mask = ~torch.isnan(x)
    _, std, count = _masked_moments(x, mask, dim=1, ddof=0)
    var = (std * std).squeeze(1)
    return torch.where(count.squeeze(1) >= 2, var, torch.full_like(var, float("nan")))


def _flat_scale(emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """S_l = 2 · mean|a_l| · mean|b_l| over the valid responses: `[N, G, 2K]` → `[N, 1, K]`."""
    a, b = split_pairs(emb.abs())
    mask = valid.unsqueeze(-1)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1)
    mean_a = torch.where(mask, a, torch.zeros_like(a)).sum(dim=1, keepdim=True) / count
    mean_b = torch.where(mask, b, torch.zeros_like(b)).sum(dim=1, keepdim=True) / count
    return 2 * mean_a * mean_b


def _check_inputs(
    embeddings: torch.Tensor, eigenvalues: torch.Tensor | None, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return embeddings, eigenvalues `[N, K]` and weights `[K]` in one dtype."""
    if embeddings.dim() != 3 or embeddings.shape[-1] % 2:
        raise ValueError(f"embeddings must be [N, G, 2K], got {tuple(embeddings.shape)}")
    n, _, d = embeddings.shape
    k = d // 2
    dtype = _work_dtype(embeddings)
    emb = embeddings.to(dtype)
    if eigenvalues is None:
        lam = torch.ones(n, k, dtype=dtype, device=emb.device)
    elif eigenvalues.shape != (n, k):
        raise ValueError(f"eigenvalues must be [N, K] = {(n, k)}, got {tuple(eigenvalues.shape)}")
    else:
        lam = eigenvalues.to(device=emb.device, dtype=dtype)
    if weights is None:
        m = torch.ones(k, dtype=dtype, device=emb.device)
    elif weights.shape != (k,):
        raise ValueError(f"weights must be [K] = {(k,)}, got {tuple(weights.shape)}")
    else:
        m = weights.to(device=emb.device, dtype=dtype)
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"weights must be finite, got {weights.tolist()}")
    return emb, lam, m


def gprl_advantages(
    embeddings: torch.Tensor,
    eigenvalues: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    *,
    eps: float = DEFAULT_EPS,
    ddof: int = DEFAULT_DDOF,
    normalization: Normalization = "per_dimension",
) -> GPRLAdvantages:
    """GPRL advantages from GPM embeddings: `[N, G, 2K]`, `[N, K]`, `[K]` → `GPRLAdvantages`.

    normalization="per_dimension" (GPRL, TRL's "normalize_then_sum"):
        Â(i) = Σ_l m_l λ_l (ŝ_l(i) − μ_l) / σ_l            σ_l per group and axis
    normalization="global" (ablation, TRL's "sum_then_normalize"): with u(i) = Σ_l m_l λ_l ŝ_l(i),
        Â(i) = (u(i) − μ_u) / σ_u                          σ_u per group
    Both over the valid responses of each group, ddof as given (default 0), a group or axis with
    σ ≤ eps · S (S the magnitude of the cancelling terms, see the module docstring) counts as flat
    and gets 0. `eigenvalues=None` means an ungated GPM (λ = 1), `weights=None` means m = 1 (the
    drift controller off). Non-finite embedding rows are unscored: advantage 0, left out of ŝ;
    a group with non-finite eigenvalues (a failed request) is unscored as a whole.
    """
    if normalization not in ("per_dimension", "global"):
        raise ValueError(f"normalization must be 'per_dimension' or 'global': {normalization!r}")
    emb, lam, m = _check_inputs(embeddings, eigenvalues, weights)
    # A group whose gate failed (non-finite λ, as the client returns for failed groups) is unscored.
    valid = torch.isfinite(emb).all(dim=-1) & torch.isfinite(lam).all(dim=-1, keepdim=True)
    s_hat = _group_scores(emb, valid)  # (N, G, K), NaN where unscored or G' < 2
    valid_count = valid.sum(dim=1)  # (N,)
    mask = (valid & (valid_count >= 2).unsqueeze(-1)).unsqueeze(-1).expand_as(s_hat)
    mean, std, _ = _masked_moments(s_hat, mask, dim=1, ddof=ddof)  # (N, 1, K)
    scale = _flat_scale(emb, valid)  # (N, 1, K)
    coef = m * torch.nan_to_num(lam, nan=0.0, posinf=0.0, neginf=0.0).unsqueeze(1)  # (N, 1, K)
    if normalization == "per_dimension":
        flat = ~(std > eps * scale)  # NaN std (too few responses) counts as flat
        denom = std
    else:
        u = torch.where(mask, s_hat * coef, torch.zeros_like(s_hat)).sum(dim=-1)  # (N, G)
        _, u_std, _ = _masked_moments(u, mask[..., 0], dim=1, ddof=ddof)  # (N, 1)
        u_scale = (scale * coef.abs()).sum(dim=-1)  # (N, 1)
        flat = (~(u_std > eps * u_scale)).unsqueeze(-1).expand_as(std)
        denom = u_std.unsqueeze(-1)
    keep = mask & ~flat
    normalized = torch.where(keep, (s_hat - mean) / denom, torch.zeros_like(s_hat))
    return GPRLAdvantages(
        advantages=(normalized * coef).sum(dim=-1),
        group_scores=s_hat,
        normalized=normalized,
        valid=valid,
        group_std=std.squeeze(1),
        flat=flat.squeeze(1),
        axis_variance=axis_variance(s_hat, lam),
        valid_count=valid_count,
    )


def gpm_scalar_reward(
    embeddings: torch.Tensor, eigenvalues: torch.Tensor | None, tau: float = DEFAULT_TAU
) -> torch.Tensor:
    """The GPM as a scalar reward: r(i) = Σ_l λ_l ŝ_l(i) / τ, `[N, G, 2K]`, `[N, K]` → `[N, G]`.

    Equals the mean over valid j ≠ i of the GPM logit s(i ≻ j)/τ. NaN where unscored or G' < 2.
    Feed it to `scalar_grpo_advantages` for the "scalar GRPO on the GPM score" ablation.
    """
    emb, lam, _ = _check_inputs(embeddings, eigenvalues, None)
    s_hat = _group_scores(emb, torch.isfinite(emb).all(dim=-1))
    return (s_hat * lam.unsqueeze(1)).sum(dim=-1) / tau


def scalar_grpo_advantages(
    scores: torch.Tensor, *, eps: float = DEFAULT_EPS, ddof: int = DEFAULT_DDOF
) -> torch.Tensor:
    """GRPO group normalisation of a scalar reward: `[N, G]` → `[N, G]`.

        Â(i) = (r(i) − μ) / σ        μ, σ over the finite rewards of the group (ddof as given)

    Non-finite rewards are unscored (advantage 0, left out of μ, σ); groups with fewer than two
    scored responses, or with σ ≤ eps · mean|r| (flat up to round-off), give 0. Same conventions
    as `gprl_advantages`, so K = 1 with a Bradley-Terry embedding gives identical numbers.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, G], got {tuple(scores.shape)}")
    r = scores.to(_work_dtype(scores))
    valid = torch.isfinite(r)
    mask = valid & (valid.sum(dim=1, keepdim=True) >= 2)
    mean, std, count = _masked_moments(r, mask, dim=1, ddof=ddof)
    scale = torch.where(mask, r.abs(), torch.zeros_like(r)).sum(dim=1, keepdim=True)
    flat = ~(std > eps * scale / count.clamp_min(1))
    return torch.where(mask & ~flat, (r - mean) / std, torch.zeros_like(r))
