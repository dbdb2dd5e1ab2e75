"""A small Gaussian policy over the latent response style u ∈ R³ (see env.py).

    u | x ~ N(μ(x), σ² I),    μ(x) = b + W φ(x),    σ fixed (the reference policy's spread)

Linear in the prompt features, so it can learn the prompt's ideal length ℓ*(x) = spread·φ₀(x).
σ is not learned on purpose: against the length axis (convex in ℓ, the proxy scores exp(ℓ)) a
learned σ grows without bound, which makes the length of every answer a lottery and the testbed
about variance seeking instead of the drift of the mean we want to study.
The reference policy is a frozen copy of the initial one.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)


class GaussianPolicy(nn.Module):
    """π(u | x) with mean `b + W φ(x)` and a fixed std."""

    def __init__(self, prompt_dim: int, mean: tuple[float, ...], std: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(mean, dtype=torch.float32))
        self.weight = nn.Parameter(torch.zeros(len(mean), prompt_dim))
        self.register_buffer("log_std", torch.full((len(mean),), math.log(std)))

    def mean(self, prompts: torch.Tensor) -> torch.Tensor:
        """μ(x): `[N, P]` → `[N, 3]`."""
        return self.bias + prompts @ self.weight.T

    def sample(self, prompts: torch.Tensor, g: int, gen: torch.Generator) -> torch.Tensor:
        """G responses per prompt, without gradient: `[N, P]` → `[N, G, 3]`."""
        with torch.no_grad():
            mu = self.mean(prompts).unsqueeze(1)
            noise = torch.randn(prompts.shape[0], g, mu.shape[-1], generator=gen)
            return mu + self.log_std.exp() * noise

    def log_prob(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """log π(u | x): `[N, P]`, `[N, G, 3]` → `[N, G]`."""
        mu = self.mean(prompts).unsqueeze(1)
        z = (responses - mu) / self.log_std.exp()
        return (-0.5 * z**2 - self.log_std - 0.5 * LOG_2PI).sum(dim=-1)

    def kl_to(self, other: GaussianPolicy, prompts: torch.Tensor) -> torch.Tensor:
        """KL(π(·|x) ‖ π_other(·|x)) in closed form (diagonal Gaussians): `[N, P]` → `[N]`.

        GRPO estimates this KL per token with k3 = exp(r) − r − 1 because it has no closed form
        for a language model; here it has one, and k3's heavy tail (exp(r) once the policy is many
        σ from the reference) made plain-SGD runs diverge, so the exact value is used.
        """
        diff = self.mean(prompts) - other.mean(prompts)
        var, var_o = (2 * self.log_std).exp(), (2 * other.log_std).exp()
        terms = (var + diff**2) / var_o - 1 + 2 * (other.log_std - self.log_std)
        return 0.5 * terms.sum(dim=-1)

    def frozen_copy(self) -> GaussianPolicy:
        """A detached copy (the reference policy)."""
        ref = copy.deepcopy(self)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref
