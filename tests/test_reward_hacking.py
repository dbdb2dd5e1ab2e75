"""The reward-hacking testbed (benchmarks/reward_hacking): environment math, policy, training."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from benchmarks.reward_hacking.env import RewardHackingEnv
from benchmarks.reward_hacking.policy import GaussianPolicy
from benchmarks.reward_hacking.run import main as run_main
from benchmarks.reward_hacking.run import merge_results
from benchmarks.reward_hacking.summary import seed_summary
from benchmarks.reward_hacking.train import TrainConfig, Variant, train, variant_drift
from gprl_client.drift import PRESETS, drift_config
from gprl_client.gpm_math import per_dimension_scores

# Training runs: one torch thread, so no kernel splits a sum differently on a machine with more
# cores (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = TrainConfig(steps=60, n_prompts=8)
FULL = Variant("gprl_full", "exploitable", "per_dimension", controller=True)


@pytest.fixture(scope="module")
def env() -> RewardHackingEnv:
    return RewardHackingEnv()


@pytest.fixture(scope="module")
def full_log(env: RewardHackingEnv) -> dict[str, list]:
    """Full GPRL on the exploitable proxy, quick setting, seed 0 (shared by several tests)."""
    return train(env, FULL, QUICK, seed=0)


@pytest.fixture(scope="module")
def noop_logs(env: RewardHackingEnv) -> dict[str, dict[str, list]]:
    """GPRL without controller (monitor only) on the exploitable and the clean proxy."""
    noop = replace(FULL, controller=False)
    return {
        "exploitable": train(env, noop, QUICK, seed=0),
        "clean": train(env, replace(noop, proxy="clean"), QUICK, seed=0),
    }


def _responses(lengths: torch.Tensor, help_: float = 0.0, harm: float = 0.0) -> torch.Tensor:
    """One prompt, G responses that differ only in log-length: `[G]` → `[1, G, 3]`."""
    u = torch.zeros(1, lengths.numel(), 3)
    u[..., 0], u[..., 1], u[..., 2] = help_, harm, lengths
    return u


def test_true_quality_is_an_inverted_u_in_length(env: RewardHackingEnv) -> None:
    prompts = torch.randn(1, env.config.prompt_dim, generator=torch.Generator().manual_seed(0))
    ideal = float(env.ideal_log_length(prompts))
    lengths = ideal + torch.linspace(-2.5, 2.5, 51)  # inside the floor (|gap| < w·√2)
    q = env.features(prompts, _responses(lengths)).quality[0]
    top = int(q.argmax())
    assert abs(float(lengths[top]) - ideal) < 1e-5  # the peak is at the prompt's ideal length
    assert (q[1 : top + 1] > q[:top]).all()  # verbosity helps up to the ideal ...
    assert (q[top + 1 :] < q[top:-1]).all()  # ... then hurts
    far = env.features(prompts, _responses(torch.tensor([ideal + 10.0]))).quality
    assert float(far) == pytest.approx((1 + env.config.floor) / 3, abs=1e-6)  # down to the floor
    # explicit formula, one response at a time
    for i in (0, 17, 25, 33, 50):
        gap = (float(lengths[i]) - ideal) / env.config.width
        g = max(env.config.floor, 1 - gap**2)
        expected = (2 * (1 / (1 + math.exp(0.0))) + g) / 3
        assert float(q[i]) == pytest.approx(expected, abs=1e-6)


def test_exploitable_axis_is_monotone_and_the_clean_one_is_not(env: RewardHackingEnv) -> None:
    cfg = replace(env.config, proxy_noise=0.0)
    quiet = RewardHackingEnv(cfg)
    prompts = torch.zeros(1, cfg.prompt_dim)  # ℓ* = 0
    feats = quiet.features(prompts, _responses(torch.linspace(-3, 3, 41)))
    gen = torch.Generator().manual_seed(0)
    f_exp, _ = quiet.proxy_features("exploitable", prompts, feats, gen)
    f_clean, _ = quiet.proxy_features("clean", prompts, feats, gen)
    assert (f_exp[0, 1:, 2] > f_exp[0, :-1, 2]).all()  # keeps rewarding length
    assert torch.allclose(f_clean[0, :, 2], feats.verbosity_fit[0])  # the true inverted U
    assert int(f_clean[0, :, 2].argmax()) == 20
    # the exploitable axis is the tangent of g (as a function of L = exp ℓ) at the reference
    ref = torch.tensor(cfg.ref_mean[2], dtype=torch.float64)
    h = 1e-4
    g = lambda length: 1 - (torch.log(length) / cfg.width) ** 2  # noqa: E731
    slope = (g(ref.exp() + h) - g(ref.exp() - h)) / (2 * h)
    assert quiet.length_gain == pytest.approx(float(slope), rel=1e-5)


def test_proxy_embeddings_give_feature_differences(env: RewardHackingEnv) -> None:
    gen = torch.Generator().manual_seed(1)
    prompts = env.sample_prompts(3, gen)
    responses = torch.randn(3, 5, 3, generator=gen)
    feats = env.features(prompts, responses)
    for proxy, k in (("exploitable", 3), ("clean", 3), ("scalar", 1)):
        f, lam = env.proxy_features(proxy, prompts, feats, torch.Generator().manual_seed(2))
        emb = env.embed(f)
        assert emb.shape == (3, 5, 2 * k) and lam.shape == (3, k)
        assert torch.allclose(lam.sum(-1), torch.ones(3))
        for n in range(3):  # explicit double loop against the shared GPM score
            for i in range(5):
                for j in range(5):
                    s = per_dimension_scores(emb[n, i], emb[n, j])
                    assert torch.allclose(s, f[n, i] - f[n, j], atol=1e-6)
    f3, lam3 = env.proxy_features("exploitable", prompts, feats, torch.Generator().manual_seed(2))
    f1, _ = env.proxy_features("scalar", prompts, feats, torch.Generator().manual_seed(2))
    assert torch.allclose(f1[..., 0], (f3 * lam3.unsqueeze(1)).sum(-1), atol=1e-6)
    assert lam3.std(dim=0).min() > 0  # eigenvalues depend on the prompt


def test_policy_log_prob_and_kl(env: RewardHackingEnv) -> None:
    cfg = env.config
    policy = GaussianPolicy(cfg.prompt_dim, cfg.ref_mean, cfg.ref_std)
    gen = torch.Generator().manual_seed(3)  # every draw below: not the global, order-dependent RNG
    with torch.no_grad():
        policy.weight.normal_(generator=gen)
    prompts = env.sample_prompts(4, gen)
    u = policy.sample(prompts, 6, gen)
    dist = torch.distributions.Normal(policy.mean(prompts).unsqueeze(1), cfg.ref_std)
    assert torch.allclose(policy.log_prob(prompts, u), dist.log_prob(u).sum(-1), atol=1e-5)
    ref = policy.frozen_copy()
    assert not any(p.requires_grad for p in ref.parameters())
    assert torch.allclose(policy.kl_to(ref, prompts), torch.zeros(4))
    with torch.no_grad():
        ref.bias[0] -= 0.3
        ref.weight.normal_(generator=gen)
    ref_dist = torch.distributions.Normal(ref.mean(prompts).unsqueeze(1), cfg.ref_std)
    expected = torch.distributions.kl_divergence(dist, ref_dist).sum(-1)[:, 0]
    assert torch.allclose(policy.kl_to(ref, prompts), expected, atol=1e-5)
    # explicit Monte Carlo reference: mean of log π − log π_ref under π
    many = policy.sample(prompts, 40000, gen)
    mc = (policy.log_prob(prompts, many) - ref.log_prob(prompts, many)).mean(dim=1)
    assert torch.allclose(policy.kl_to(ref, prompts).detach(), mc.detach(), rtol=0.05, atol=0.02)


def test_training_improves_proxy_reward_and_true_quality_early(full_log: dict) -> None:
    log = full_log
    assert len(log["true_quality"]) == QUICK.steps
    first, last = slice(0, 10), slice(-10, None)
    mean = lambda key, s: sum(log[key][s]) / len(log[key][s])  # noqa: E731
    assert mean("proxy_reward", last) > mean("proxy_reward", first) + 0.1
    assert mean("true_quality", last) > mean("true_quality", first) + 0.05
    assert mean("log_length", last) > mean("log_length", first)  # the proxy pulls length up


def test_k1_gprl_is_scalar_grpo_on_the_same_proxy(env: RewardHackingEnv) -> None:
    """With K = 1 per-dimension GPRL is GRPO (gprl-math §2); here the whole run must agree."""
    cfg = replace(QUICK, steps=15)
    scalar = train(env, Variant("s", "exploitable", "scalar_grpo", False), cfg, seed=4)
    k1 = train(env, Variant("k", "scalar", "per_dimension", False), cfg, seed=4)
    assert k1["true_quality"] == pytest.approx(scalar["true_quality"], abs=1e-4)
    # and global normalisation with m = 1 is the same thing (so gprl_global differs from
    # scalar GRPO only through the controller's m, β, ε)
    glob = train(env, Variant("g", "exploitable", "global", False), cfg, seed=4)
    assert glob["true_quality"] == pytest.approx(scalar["true_quality"], abs=1e-4)


def test_controller_triggers_on_the_exploitable_axis(full_log: dict, noop_logs: dict) -> None:
    log = full_log
    summary = seed_summary(log)
    assert summary["corrections"] > 0
    m = summary["final_m"]
    assert m[2] == min(m) < 1  # the verbosity axis is the one de-weighted
    assert log["beta"][-1] > log["beta"][0]
    assert log["clip_eps"][-1] < log["clip_eps"][0]
    noop = noop_logs["exploitable"]
    assert set(noop["beta"]) == {noop["beta"][0]}  # the no-op twin never acts
    assert all(row == [1.0, 1.0, 1.0] for row in noop["m"])


def test_drift_is_larger_on_the_exploitable_proxy_than_on_the_clean_one(noop_logs: dict) -> None:
    exploit, clean = noop_logs["exploitable"], noop_logs["clean"]
    tail = slice(-10, None)
    assert min(exploit["drift"][tail]) > max(clean["drift"][tail])
    assert exploit["alpha"][-1][2] > 0.5 > clean["alpha"][-1][2]


@pytest.mark.slow
def test_run_command_writes_json_and_plots(tmp_path) -> None:
    out = tmp_path / "rh.json"
    variants = "scalar_grpo,gprl_full,gprl_full_clean,gprl_full_paper"
    args = ["--quick", "--seeds", "2", "--steps", "25", "--variants", variants, "--out", str(out)]
    assert run_main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == set(variants.split(","))
    assert set(result["targets"]) >= {"full_within_10pct_of_peak_all_seeds"}
    steps = result["variants"]["gprl_full"]["per_step"]
    assert len(steps["true_quality"]["mean"]) == 25
    assert len(result["variants"]["gprl_full"]["summary"]["per_seed"]) == 2
    assert {"alpha_0", "alpha_2", "m_2", "drift", "beta", "clip_eps"} <= set(steps)
    assert (tmp_path / "rh_overview.png").stat().st_size > 0
    assert (tmp_path / "rh_dimensions.png").stat().st_size > 0
    # --update adds a variant and keeps the others as they were
    more = ["--quick", "--seeds", "2", "--steps", "25", "--variants", "gprl_full_paper_clean"]
    assert run_main([*more, "--out", str(out), "--update", "--no-plots"]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["variants"]) == [*variants.split(","), "gprl_full_paper_clean"]
    assert merged["variants"]["gprl_full"] == result["variants"]["gprl_full"]
    assert merged["variants"]["gprl_full_paper_clean"]["drift"]["rule"] == "paper"


@pytest.mark.parametrize("threshold", [0.02, 0.2])
def test_controller_is_quiet_on_clean_and_acts_on_exploit(
    env: RewardHackingEnv, threshold: float
) -> None:
    """With the default τ_D = 0.02 (and the default growth condition: the share rule alone fired
    on the clean proxy, see docs/reward_hacking.md) and with τ_D = 0.2 the controller acts only
    on the exploitable proxy."""
    cfg = replace(QUICK, steps=80, n_prompts=16)
    cfg = replace(cfg, drift=replace(cfg.drift, threshold=threshold))
    exploit = seed_summary(train(env, FULL, cfg, seed=0))
    clean = seed_summary(train(env, replace(FULL, proxy="clean"), cfg, seed=0))
    assert exploit["corrections"] > 0 and exploit["final_m"][2] < 1
    assert clean["corrections"] == 0 and clean["final_m"] == [1.0, 1.0, 1.0]


def test_variant_drift_changes_the_rule_only() -> None:
    """A variant's preset sets the rule's knobs; every other knob comes from the shared config."""
    shared = drift_config("project", threshold=0.07, beta=0.03, ema_rate=0.2, decay_rate=0.1)
    cfg = replace(QUICK, drift=shared)
    assert variant_drift(FULL, cfg) == shared  # the project preset: the shared config itself
    paper = variant_drift(replace(FULL, drift_preset="paper"), cfg)
    assert (paper.rule, paper.growth_threshold, paper.noise_multiplier) == ("paper", 0.0, 0.0)
    rest = lambda c: {k: v for k, v in asdict(c).items() if k not in PRESETS["paper"]}  # noqa: E731
    assert rest(paper) == rest(shared)
    with pytest.raises(ValueError, match="drift_preset"):
        Variant("x", "clean", "per_dimension", True, drift_preset="nope")


def test_paper_rule_fires_on_the_clean_proxy(env: RewardHackingEnv) -> None:
    """The run where the project rule stays quiet (test above, τ_D = 0.02): the paper's rule
    (fixed τ_D, no growth condition) corrects there, so the preset reaches the training loop."""
    cfg = replace(QUICK, steps=80, n_prompts=16)
    clean = replace(FULL, proxy="clean", drift_preset="paper")
    summary = seed_summary(train(env, clean, cfg, seed=0))
    assert summary["corrections"] > 0 and summary["final_beta"] > cfg.drift.beta


def test_merge_results_refuses_other_settings() -> None:
    def result(name: str, steps: int, drop: float) -> dict:
        summary = {"per_seed": [{"drop": drop, "corrections": 1}]}
        config = {"train": {"steps": steps, "drift": {"threshold": 0.02, "rule": "project"}}}
        return {"config": config, "variants": {name: {"summary": summary}}, "command": name}

    old = result("gprl_full", 300, 0.05)
    del old["config"]["train"]["drift"]["rule"]  # recorded before the knob existed: still agrees
    merged = merge_results(old, result("gprl_full_paper", 300, 0.2))
    assert list(merged["variants"]) == ["gprl_full", "gprl_full_paper"]
    assert merged["targets"]["full_within_10pct_of_peak_all_seeds"]
    assert merged["config"]["train"]["drift"]["rule"] == "project"
    with pytest.raises(ValueError, match="different configs"):
        merge_results(old, result("gprl_full_paper", 200, 0.2))
