"""The testbed's world: prompts, the true quality of a response, and GPM proxies that score it.

Letters: N prompts, G responses per prompt, K proxy axes, D = 2K, P prompt-feature width.

A *prompt* is a context vector φ(x) ~ N(0, I_P). A *response* is a latent style vector
u = (u_help, u_harm, u_len) ∈ R³ (the policy samples it, see policy.py). Its true features:

    h = sigmoid(c·u_help)            helpfulness in [0, 1]   (saturates)
    s = sigmoid(c·u_harm)            harmlessness in [0, 1]  (saturates)
    ℓ = u_len                        log-length; the length in tokens is L = exp(ℓ) · L₀
    g = max(floor, 1 − ((ℓ − ℓ*(x)) / w)²)    verbosity fit: an inverted U around the prompt's
                                              ideal log-length ℓ*(x) = spread · φ₀(x)
    Q = (h + s + g) / 3              the true quality (≤ 1)

A GPM proxy embeds each response as K coordinate pairs (f_l(y), 1), so that its per-axis score is
s_l(i, j) = f_l(i) − f_l(j) (gpm_math's cross product), with prompt-dependent eigenvalues
λ(x) = softmax(Λ φ(x)). Three proxies (K = 3 unless noted), all with a little Gaussian noise on
each f_l (an imperfect verifier):

- "exploitable": f = (h, s, κ·L). The verbosity axis is the tangent of g, as a function of the
  length in tokens, at the reference policy's typical length: it agrees with the truth where the
  proxy was fit (answers shorter than ideal, so longer is better) and keeps rewarding length
  monotonically past the ideal. Its within-group spread grows with the length (∝ L), as the
  spread of real response lengths does.
- "clean": f = (h, s, g): every axis is a true axis; nothing to exploit (false-alarm check).
- "scalar" (K = 1): one axis f = Σ_l λ_l(x) f_l^exploitable, what a single scalar reward model
  fit to the same comparisons would learn; its eigenvalue is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROXIES = ("exploitable", "clean", "scalar")


@dataclass(frozen=True)
class EnvConfig:
    """The world's constants (all documented in docs/reward_hacking.md)."""

    prompt_dim: int = 4
    slope: float = 2.0  # c in h = sigmoid(c·u_help)
    ref_mean: tuple[float, float, float] = (-0.5, 0.0, -0.8)  # reference policy's mean u
    ref_std: float = 0.5  # reference policy's std on every latent axis
    ideal_spread: float = 0.3  # ℓ*(x) = ideal_spread · φ₀(x)
    width: float = 2.0  # w of the inverted U
    floor: float = -1.0  # a rambling answer is at worst as bad as floor on the verbosity axis
    proxy_noise: float = 0.05  # std of the verifier's noise on each f_l
    eig_scale: float = 0.3  # std of the entries of Λ (prompt dependence of λ(x))
    env_seed: int = 1234  # fixes Λ, so every run sees the same proxy


@dataclass(frozen=True)
class Features:
    """True features of a batch of responses, each `[N, G]`."""

    help: torch.Tensor
    harm: torch.Tensor
    log_length: torch.Tensor
    verbosity_fit: torch.Tensor
    quality: torch.Tensor


class RewardHackingEnv:
    """Samples prompts, computes true quality and proxy GPM embeddings for sampled responses."""

    def __init__(self, config: EnvConfig | None = None) -> None:
        self.config = config or EnvConfig()
        gen = torch.Generator().manual_seed(self.config.env_seed)
        self.eig_matrix = self.config.eig_scale * torch.randn(
            3, self.config.prompt_dim, generator=gen
        )  # Λ [K=3, P]
        self.length_gain = self._tangent_gain()

    def _tangent_gain(self) -> float:
        """κ = dg/dL at the reference mean length (ℓ* = 0 on average over prompts): the slope."""
        cfg = self.config
        ref_len = cfg.ref_mean[2]
        dg_dlog = -2.0 * ref_len / cfg.width**2  # d/dℓ of 1 − (ℓ/w)² at ℓ = ref_len
        return dg_dlog / math.exp(ref_len)  # dℓ/dL = 1/L

    def sample_prompts(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """φ(x) for `n` fresh prompts: `[N, P]`."""
        return torch.randn(n, self.config.prompt_dim, generator=gen)

    def ideal_log_length(self, prompts: torch.Tensor) -> torch.Tensor:
        """ℓ*(x): `[N, P]` → `[N]`."""
        return self.config.ideal_spread * prompts[:, 0]

    def features(self, prompts: torch.Tensor, responses: torch.Tensor) -> Features:
        """True features for responses `[N, G, 3]` to prompts `[N, P]`."""
        cfg = self.config
        h = torch.sigmoid(cfg.slope * responses[..., 0])
        s = torch.sigmoid(cfg.slope * responses[..., 1])
        ell = responses[..., 2]
        gap = (ell - self.ideal_log_length(prompts).unsqueeze(1)) / cfg.width
        g = (1.0 - gap**2).clamp_min(cfg.floor)
        return Features(h, s, ell, g, (h + s + g) / 3.0)

    def eigenvalues(self, prompts: torch.Tensor) -> torch.Tensor:
        """λ(x) = softmax(Λ φ(x)) of the K = 3 proxies: `[N, P]` → `[N, 3]`."""
        return torch.softmax(prompts @ self.eig_matrix.T, dim=-1)

    def proxy_features(
        self, proxy: str, prompts: torch.Tensor, feats: Features, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The proxy's per-axis features f `[N, G, K]` (noisy) and eigenvalues λ `[N, K]`."""
        if proxy not in PROXIES:
            raise ValueError(f"unknown proxy {proxy!r}; choose from {PROXIES}")
        if proxy == "clean":
            third = feats.verbosity_fit
        else:
            third = self.length_gain * feats.log_length.exp()
        f = torch.stack([feats.help, feats.harm, third], dim=-1)
        f = f + self.config.proxy_noise * torch.randn(f.shape, generator=gen)
        lam = self.eigenvalues(prompts)
        if proxy == "scalar":
            f = (f * lam.unsqueeze(1)).sum(dim=-1, keepdim=True)
            lam = torch.ones(prompts.shape[0], 1)
        return f, lam

    @staticmethod
    def embed(features: torch.Tensor) -> torch.Tensor:
        """GPM embeddings with axis l = (f_l, 1): `[N, G, K]` → `[N, G, 2K]`.

        With gpm_math's sign, s_l(i, j) = f_l(i)·1 − 1·f_l(j) = f_l(i) − f_l(j).
        """
        pairs = torch.stack([features, torch.ones_like(features)], dim=-1)  # [N, G, K, 2]
        return pairs.flatten(start_dim=-2)

    def proxy(
        self, proxy: str, prompts: torch.Tensor, feats: Features, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `[N, G, 2K]` and eigenvalues `[N, K]` as a GPM service would return them."""
        f, lam = self.proxy_features(proxy, prompts, feats, gen)
        return self.embed(f), lam
