"""GRPO-style training of the Gaussian policy against a GPM proxy, with the GPRL variants.

Letters: N prompts per step, G responses per prompt, K proxy axes.

Each step: sample N prompts and G responses each; the proxy returns embeddings `[N, G, 2K]` and
eigenvalues `[N, K]`; the variant turns them into advantages `[N, G]` with the project's real
`gprl_client.advantages` functions; then `inner_epochs` passes of the clipped surrogate

    L = −mean( min(ρ Â, clip(ρ, 1 − ε, 1 + ε) Â) ) + β · mean_x KL(π(·|x) ‖ π_ref(·|x)),
    ρ = π / π_old  (the KL in closed form, see policy.py)

and finally the drift monitor / controller (`gprl_client.drift`) see this step's per-axis
variances (mean over groups of Var_i(λ_l ŝ_l)) and set m, β, ε for the next step. Every variant
runs a monitor, so α(t) and D(t) are logged even where nothing acts on them (scalar GRPO, "no
controller").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.reward_hacking.env import RewardHackingEnv
from benchmarks.reward_hacking.policy import GaussianPolicy
from gprl_client.advantages import (
    GPRLAdvantages,
    gpm_scalar_reward,
    gprl_advantages,
    scalar_grpo_advantages,
)
from gprl_client.drift import (
    PRESETS,
    DriftConfig,
    DriftController,
    DriftMonitor,
    NoOpDriftController,
    drift_config,
)
from gprl_client.gpm_math import preference_score

ADVANTAGES = ("scalar_grpo", "global", "per_dimension")


@dataclass(frozen=True)
class Variant:
    """One arm of the experiment."""

    name: str
    proxy: str  # "exploitable" | "clean" | "scalar" (K = 1), see env.py
    advantage: str  # one of ADVANTAGES
    controller: bool  # DriftController (True) or NoOpDriftController (False)
    drift_preset: str = "project"  # the monitor's and controller's rule: a key of PRESETS

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.drift_preset not in PRESETS:
            raise ValueError(f"drift_preset must be one of {sorted(PRESETS)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every variant."""

    steps: int = 300
    n_prompts: int = 16  # N
    group_size: int = 8  # G
    inner_epochs: int = 2  # passes over each batch (so the clip ε matters)
    lr: float = 0.01  # plain SGD, see `train`
    drift: DriftConfig = field(default_factory=DriftConfig)  # β_0, ε_0 and the controller


def variant_drift(variant: Variant, config: TrainConfig) -> DriftConfig:
    """The drift config one variant runs with: its preset's rule knobs, every other knob (τ_D,
    β_0, ε_0, rates, bounds) from `config.drift`, so the two rules differ in the rule only.

    For the "project" preset this is `config.drift` itself (the preset sets no knob).
    """
    preset = PRESETS[variant.drift_preset]
    shared = {k: v for k, v in asdict(config.drift).items() if k not in preset}
    return drift_config(variant.drift_preset, **shared)


def _advantages(
    variant: Variant, emb: torch.Tensor, lam: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, GPRLAdvantages]:
    """Advantages `[N, G]` and the GPRL result (for the per-axis variances) of one batch.

    emb `[N, G, 2K]`, lam `[N, K]`, weights m `[K]`.
    """
    normalization = "global" if variant.advantage == "global" else "per_dimension"
    res = gprl_advantages(emb, lam, weights, normalization=normalization)
    if variant.advantage == "scalar_grpo":
        return scalar_grpo_advantages(gpm_scalar_reward(emb, lam)), res
    return res.advantages, res


def _policy_update(
    policy: GaussianPolicy,
    reference: GaussianPolicy,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    adv: torch.Tensor,
    beta: float,
    clip_eps: float,
    epochs: int,
) -> float:
    """Clipped surrogate + β·KL, `epochs` passes over the batch; returns the last mean KL."""
    prompts, responses, old_logp = batch
    kl = torch.zeros(())
    for _ in range(epochs):
        logp = policy.log_prob(prompts, responses)
        ratio = (logp - old_logp).exp()
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        kl = policy.kl_to(reference, prompts)
        loss = -surrogate.mean() + beta * kl.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(kl.detach().mean())


def _metrics(
    env: RewardHackingEnv,
    variant: Variant,
    prompts: torch.Tensor,
    responses: torch.Tensor,
    ref_resp: torch.Tensor,
    gen: torch.Generator,
) -> dict[str, float]:
    """True quality and proxy reward of this step's responses `[N, G, 3]`.

    The proxy reward is the run's own proxy score s(y ≻ y_ref | x) against reference responses.
    """
    feats = env.features(prompts, responses)
    ref_feats = env.features(prompts, ref_resp)
    emb, lam = env.proxy(variant.proxy, prompts, feats, gen)
    ref_emb, _ = env.proxy(variant.proxy, prompts, ref_feats, gen)
    margin = preference_score(emb, ref_emb, lam.unsqueeze(1))  # [N, G]: s(y ≻ y_ref | x)
    return {
        "true_quality": float(feats.quality.mean()),
        "proxy_reward": float(margin.mean()),
        "helpfulness": float(feats.help.mean()),
        "harmlessness": float(feats.harm.mean()),
        "verbosity_fit": float(feats.verbosity_fit.mean()),
        "log_length": float(feats.log_length.mean()),
    }


def train(
    env: RewardHackingEnv, variant: Variant, config: TrainConfig, seed: int
) -> dict[str, list]:
    """Run one variant with one seed; returns per-step lists (keys: summary.py)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = env.config
    policy = GaussianPolicy(cfg.prompt_dim, cfg.ref_mean, cfg.ref_std)
    reference = policy.frozen_copy()
    # SGD, not Adam: each latent axis has its own parameters here, so Adam's per-parameter
    # rescaling would undo any reweighting of the axes (m, normalisation) that GPRL is about.
    opt = torch.optim.SGD(policy.parameters(), lr=config.lr)
    k = 1 if variant.proxy == "scalar" else 3
    drift = variant_drift(variant, config)
    monitor = DriftMonitor(k, drift)  # the rule picks l* in the monitor too
    ctrl_cls = DriftController if variant.controller else NoOpDriftController
    controller = ctrl_cls(k, drift)
    log: dict[str, list] = {}
    for _ in range(config.steps):
        prompts = env.sample_prompts(config.n_prompts, gen)
        responses = policy.sample(prompts, config.group_size, gen)
        ref_resp = reference.sample(prompts, config.group_size, gen)
        emb, lam = env.proxy(variant.proxy, prompts, env.features(prompts, responses), gen)
        state = controller.state  # m, β, ε in force for this step
        adv, res = _advantages(variant, emb, lam, controller.weights)
        with torch.no_grad():
            old_logp = policy.log_prob(prompts, responses)
        batch = (prompts, responses, old_logp)
        kl = _policy_update(
            policy, reference, opt, batch, adv, state.beta, state.clip_eps, config.inner_epochs
        )
        mon = monitor.update(res.mean_axis_variance)
        controller.update(mon)
        row = _metrics(env, variant, prompts, responses, ref_resp, gen)
        row.update(
            kl=kl,
            drift=mon.drift,
            alpha=list(mon.alpha) if mon.alpha else [math.nan] * k,
            axis_var=res.mean_axis_variance.tolist(),  # absolute Var(λ_l ŝ_l), before shares
            m=list(state.weights),
            beta=state.beta,
            clip_eps=state.clip_eps,
            active=float(controller.state.active),
        )
        for key, value in row.items():
            log.setdefault(key, []).append(value)
    return log
