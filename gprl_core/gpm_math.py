"""The General Preference Model score: one implementation, shared by server and client.

Letters (see docs/math.md): N groups, G responses per group, K subspaces, D = 2K.
Subspace l holds the coordinate pair (a_l, b_l) = (v[2l], v[2l+1]).

    s_l(i, j) = a_l(i) * b_l(j) - b_l(i) * a_l(j)        (2-D cross product, reference-code sign)
    s(i ≻ j)  = Σ_l λ_l * s_l(i, j)
    P(i ≻ j)  = sigmoid(s(i ≻ j) / τ)

Pure torch: no I/O, no HTTP, no trainer imports.
"""

from __future__ import annotations

import torch

DEFAULT_TAU = 0.1


def split_pairs(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `[..., 2K]` embeddings into `(a, b)`, each `[..., K]`."""
    if embeddings.shape[-1] % 2:
        raise ValueError(f"embedding width must be even (2K), got {embeddings.shape[-1]}")
    return embeddings[..., 0::2], embeddings[..., 1::2]


def l2_normalize(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`v / max(‖v‖₂, eps)` over the last axis (the released usage code's normalisation)."""
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(eps)


def per_dimension_scores(emb_i: torch.Tensor, emb_j: torch.Tensor) -> torch.Tensor:
    """`s_l(i, j)` for broadcastable `[..., 2K]` inputs → `[..., K]` (no eigenvalues)."""
    a_i, b_i = split_pairs(emb_i)
    a_j, b_j = split_pairs(emb_j)
    return a_i * b_j - b_i * a_j


def preference_score(
    emb_i: torch.Tensor, emb_j: torch.Tensor, eigenvalues: torch.Tensor | None = None
) -> torch.Tensor:
    """`s(i ≻ j) = Σ_l λ_l s_l(i, j)`; `[..., 2K]`, `[..., 2K]`, `[..., K]` → `[...]`.

    Without eigenvalues every λ_l = 1 (an ungated GPM).
    """
    s = per_dimension_scores(emb_i, emb_j)
    if eigenvalues is not None:
        s = s * eigenvalues
    return s.sum(dim=-1)


def preference_probability(
    emb_i: torch.Tensor,
    emb_j: torch.Tensor,
    eigenvalues: torch.Tensor | None = None,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """`P(i ≻ j) = sigmoid(s(i ≻ j) / τ)`; shapes as `preference_score`."""
    return torch.sigmoid(preference_score(emb_i, emb_j, eigenvalues) / tau)


def group_scores(embeddings: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-dimension group scores ŝ_l(i) = 1/(G'-1) Σ_{j≠i, j valid} s_l(i, j).

    Shapes: embeddings `[N, G, 2K]`, valid `[N, G]` bool (default: all) → `[N, G, K]`.
    Uses the bilinear shortcut `(a_l(i) B_l − b_l(i) A_l) / (G'−1)` with `A_l = Σ_j a_l(j)`,
    `B_l = Σ_j b_l(j)` over valid j: O(N·G·K). `G'` is the number of valid responses in the group.
    Invalid rows (and groups with fewer than two valid responses) get NaN, so callers cannot
    mistake "not scored" for a score of zero. No eigenvalues: they are applied by the caller.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be [N, G, 2K], got {tuple(embeddings.shape)}")
    if valid is None:
        valid = ~torch.isnan(embeddings).any(dim=-1)
    clean = torch.where(valid.unsqueeze(-1), embeddings, torch.zeros_like(embeddings))
    a, b = split_pairs(clean)  # (N, G, K) each
    a_sum = a.sum(dim=1, keepdim=True)  # (N, 1, K)
    b_sum = b.sum(dim=1, keepdim=True)
    count = valid.sum(dim=1, keepdim=True).unsqueeze(-1).to(embeddings.dtype)  # (N, 1, 1)
    scores = (a * b_sum - b * a_sum) / (count - 1).clamp_min(1)
    ok = valid.unsqueeze(-1) & (count >= 2)
    return torch.where(ok, scores, torch.full_like(scores, float("nan")))


def preference_matrix(
    embeddings: torch.Tensor, eigenvalues: torch.Tensor | None = None, tau: float = DEFAULT_TAU
) -> torch.Tensor:
    """`M[n, i, j] = P(i ≻ j)` within each group: `[N, G, 2K]`, `[N, K]` → `[N, G, G]`."""
    eig = None if eigenvalues is None else eigenvalues[:, None, None, :]
    return preference_probability(embeddings[:, :, None, :], embeddings[:, None, :, :], eig, tau)
