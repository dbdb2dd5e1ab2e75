"""The controller's two rules: the paper's, checked against a trajectory worked out by hand from
docs/math.md §3, and how it differs from the project's growth-gated rule."""

from __future__ import annotations

import json
import math

import pytest

from gprl_client.drift import (
    DriftConfig,
    DriftController,
    DriftMonitor,
    drift_config,
)

# K = 2; r = 0.5; B = 2 baseline steps; τ_D = 0.05; η = 0.1; β 0.01 → 0.1 at rate 0.5;
# ε 0.2 → 0.1 at rate 0.5; decay factor exp(−ln 2) = 0.5.
HAND = dict(
    ema_rate=0.5,
    baseline_steps=2,
    threshold=0.05,
    weight_step=0.1,
    weight_min=0.5,
    weight_max=1.5,
    beta=0.01,
    beta_max=0.1,
    beta_rate=0.5,
    clip_eps=0.2,
    clip_eps_min=0.1,
    clip_rate=0.5,
    decay_rate=math.log(2),
)
VARIANCES = [[1.0, 1.0], [1.0, 1.0], [3.0, 1.0], [3.0, 1.0], [1.0, 1.0]]


def run(config: DriftConfig, variances: list[list[float]]):
    monitor, controller = DriftMonitor(2, config), DriftController(2, config)
    out = []
    for v in variances:
        m = monitor.update(v)
        out.append((m, controller.update(m)))
    return out


def test_paper_rule_hand_computed_trajectory() -> None:
    """By hand:
    steps 1–2: shares (.5, .5) → α(0) = (.5, .5), D(2) = 0: quiet.
    step 3: share (.75, .25), ᾱ = (.625, .375),
            D = .625 ln 1.25 + .375 ln .75 = 0.031583 ≤ τ_D: quiet.
    step 4: ᾱ = (.6875, .3125), D = .6875 ln 1.375 + .3125 ln .625 = 0.072061 > τ_D:
            l* = argmax ᾱ/α(0) = argmax (1.375, .625) = 0 → m = (.9, 1.1);
            β = .01 + .5 (.1 − .01) = .055; ε = .2 − .5 (.2 − .1) = .15.
    step 5: share (.5, .5), ᾱ = (.59375, .40625),
            D = .59375 ln 1.1875 + .40625 ln .8125 = 0.017683 ≤ τ_D: decay by 1/2:
            m = (.95, 1.05), β = .0325, ε = .175.
    """
    traj = run(drift_config("paper", **HAND), VARIANCES)
    (m2, c2), (m3, c3), (m4, c4), (m5, c5) = traj[1:]
    assert m2.baseline == pytest.approx((0.5, 0.5)) and m2.drift == pytest.approx(0.0)
    assert not c2.active and c2.weights == (1.0, 1.0)
    assert m3.alpha == pytest.approx((0.625, 0.375))
    assert m3.drift == pytest.approx(0.031583, abs=1e-6) and not c3.active
    assert m4.drift == pytest.approx(0.072061, abs=1e-6)
    assert m4.ratio == pytest.approx((1.375, 0.625)) and m4.over_exploited == 0
    assert c4.active and c4.corrections == 1
    assert c4.weights == pytest.approx((0.9, 1.1))
    assert c4.beta == pytest.approx(0.055) and c4.clip_eps == pytest.approx(0.15)
    assert m5.drift == pytest.approx(0.017683, abs=1e-6) and not c5.active
    assert c5.weights == pytest.approx((0.95, 1.05))
    assert c5.beta == pytest.approx(0.0325) and c5.clip_eps == pytest.approx(0.175)
    assert c5.threshold == 0.05  # a fixed τ_D: no noise floor in the paper's rule


def test_paper_rule_picks_the_axis_by_share_ratio() -> None:
    """Axis 0 keeps the largest share but no more than its baseline's; axis 1's share grows
    against its own baseline: the paper's l* = argmax ᾱ_l/α_l(0) is axis 1, not argmax ᾱ_l."""
    variances = [[4.0, 1.0, 1.0]] * 3 + [[4.0, 2.5, 0.2]] * 6
    cfg = drift_config("paper", baseline_steps=3, ema_rate=0.5, threshold=0.01)
    monitor = DriftMonitor(3, cfg)
    for v in variances:
        state = monitor.update(v)
    ratio = state.ratio
    assert state.over_exploited == max(range(3), key=ratio.__getitem__) == 1


def test_min_baseline_share_keeps_a_dead_axis_out_of_l_star() -> None:
    """Axis 0 carries ~1e-5 of the variance (as the default verifier's axis 0 does on real
    prompts): a noisy blip there gives it the largest ratio ᾱ_0/α_0(0), so the paper's l* is the
    dead axis; with min_baseline_share = 0.01 it is the live axis that grew (1 over 2)."""
    variances = [[1e-5, 0.9, 0.1]] * 4 + [[1e-4, 1.8, 0.1]] * 4
    common = dict(baseline_steps=4, ema_rate=0.5, threshold=0.01)
    exact = DriftMonitor(3, drift_config("paper", **common))
    guarded = DriftMonitor(3, drift_config("paper", min_baseline_share=0.01, **common))
    for v in variances:
        a, b = exact.update(v), guarded.update(v)
    baseline = (1e-5 / 1.00001, 0.9 / 1.00001, 0.1 / 1.00001)
    assert a.baseline == pytest.approx(baseline) and a.drift > 0.01
    assert a.ratio[0] > a.ratio[1] > 1 > a.ratio[2]  # the dead axis's ratio is the largest
    assert a.over_exploited == 0 and b.over_exploited == 1
    assert a.drift == b.drift and a.ratio == b.ratio  # only the choice of l* differs
    nothing = DriftMonitor(3, drift_config("paper", min_baseline_share=0.99, **common))
    for v in variances:
        c = nothing.update(v)
    assert c.over_exploited == 0  # no axis qualifies: fall back to every axis (the paper's rule)
    with pytest.raises(ValueError, match="min_baseline_share"):
        drift_config("paper", min_baseline_share=1.0)


def test_bounded_variance_exploit_corrected_by_paper_rule_only() -> None:
    """L2-normalised embeddings bound Var(ŝ_l) by 1: an axis starting at 0.6 can grow at most
    1.67×, so the project rule's 2× growth gate never opens, while the spectrum tilts far past
    τ_D. The paper's rule corrects it; the project rule does not (the issue's point)."""
    variances = [[0.6, 0.3, 0.3]] * 5 + [[min(1.0, 0.6 + 0.05 * t), 0.3, 0.3] for t in range(30)]
    common = dict(baseline_steps=5, ema_rate=0.2, threshold=0.01)
    paper = run3(drift_config("paper", **common), variances)
    project = run3(drift_config("project", **common), variances)
    assert max(m.drift for m, _ in paper[5:]) > 0.01
    assert paper[-1][1].corrections > 0 and paper[-1][1].weights[0] < 1.0
    assert project[-1][1].corrections == 0 and max(m.growth[0] for m, _ in project[5:]) < 2


def run3(config: DriftConfig, variances: list[list[float]]):
    monitor, controller = DriftMonitor(3, config), DriftController(3, config)
    return [(m, controller.update(m)) for m in map(monitor.update, variances)]


def test_paper_rule_decays_only_when_drift_falls_back() -> None:
    """While D stays above τ_D the paper's rule keeps correcting (it never decays there); the
    first step with D ≤ τ_D decays."""
    cfg = drift_config("paper", **HAND)
    traj = run(cfg, VARIANCES[:2] + [[3.0, 1.0]] * 6 + [[1.0, 3.0]] * 8)
    for m, c in traj[2:]:
        assert c.active == (m.drift > cfg.threshold)
    assert any(not c.active for _, c in traj[8:])


def test_presets_and_validation() -> None:
    paper = drift_config("paper")
    assert paper.rule == "paper" and paper.growth_threshold == 0 and paper.noise_multiplier == 0
    assert drift_config("project") == DriftConfig()
    assert drift_config("paper", threshold=0.1).threshold == 0.1
    with pytest.raises(ValueError, match="unknown drift preset"):
        drift_config("nope")
    with pytest.raises(ValueError, match="rule"):
        DriftConfig(rule="other")
    with pytest.raises(ValueError, match="growth_threshold and noise_multiplier must be 0"):
        DriftConfig(rule="paper")  # the project's growth gate under the paper's rule


def test_paper_state_round_trips_through_json() -> None:
    cfg = drift_config("paper", **HAND)
    monitor, controller = DriftMonitor(2, cfg), DriftController(2, cfg)
    for v in VARIANCES[:4]:
        controller.update(monitor.update(v))
    m2, c2 = DriftMonitor(2, cfg), DriftController(2, cfg)
    m2.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    c2.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert m2.state == monitor.state and c2.state == controller.state
    assert controller.update(monitor.update([1.0, 1.0])) == c2.update(m2.update([1.0, 1.0]))


def test_gprl_train_takes_an_axis_prior(capsys) -> None:
    """`--drift.axis-prior` reaches the DriftConfig scaled to mean 1; a bad one is refused
    before anything starts."""
    pytest.importorskip("openrlhf")
    from gprl_client.openrlhf.launcher import gprl_options, gprl_parser, train_main

    options = gprl_options(gprl_parser().parse_args(["--drift.axis-prior", "1,1,0"]))
    assert options["drift"] == {"axis_prior": (1.0, 1.0, 0.0)}
    config = drift_config(options["drift_preset"], **options["drift"])
    assert config.axis_prior == (1.5, 1.5, 0.0)
    good = ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "8"]
    good += ["--reward.remote_url", "http://gpm:8000/openrlhf/reward", "--algo.kl.use_loss"]
    assert train_main(["--no-ray-init", "--drift.axis-prior", "0,0", "--", *good]) == 2
    assert "axis_prior" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gprl_parser().parse_args(["--drift.axis-prior", "1,x"])
    assert "comma-separated numbers" in capsys.readouterr().err


def test_gprl_train_selects_the_paper_preset(monkeypatch) -> None:
    pytest.importorskip("openrlhf")
    from gprl_client.openrlhf.launcher import gprl_options, gprl_parser

    ns = gprl_parser().parse_args(["--drift.preset", "paper", "--drift.threshold", "0.05"])
    options = gprl_options(ns)
    assert options["drift_preset"] == "paper" and options["drift"] == {"threshold": 0.05}
    assert "--drift.rule" not in gprl_parser().format_help()
