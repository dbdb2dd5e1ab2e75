"""Drift monitor and controller: false positives, detection, convergence without exploitation,
bounds, decay, state round-trip."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gprl_client.advantages import axis_variance
from gprl_client.drift import (
    ControlState,
    DriftConfig,
    DriftController,
    DriftMonitor,
    MonitorState,
    NoOpDriftController,
    kl_divergence,
    project_weights,
)
from gprl_client.gpm_math import group_scores

K = 3
SCALES = torch.tensor([1.0, 0.7, 0.5], dtype=torch.float64)  # unequal axes, as a real GPM has


def simulated_steps(
    seed: int, steps: int, n: int = 32, g: int = 8, growth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random GPM batches → (group scores `[steps, N, G, K]`, eigenvalues `[steps, N, K]`).

    `growth` `[steps, K]` multiplies each axis's embedding scale per step (1 = stationary).
    """
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(steps * n, g, 2 * K, generator=gen, dtype=torch.float64)
    scale = SCALES.expand(steps, K) if growth is None else SCALES * growth
    emb = emb * scale.repeat_interleave(n, dim=0).repeat_interleave(2, dim=-1)[:, None, :]
    lam = torch.softmax(0.3 * torch.randn(steps * n, K, generator=gen, dtype=torch.float64), -1)
    return group_scores(emb).view(steps, n, g, K), lam.view(steps, n, K)


def step_variances(scores: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per step, the mean over groups of Var_i(λ_l ŝ_l): `[steps, N, G, K]` → `[steps, K]`."""
    steps, n, g, k = scores.shape
    var = axis_variance(scores.reshape(steps * n, g, k), lam.reshape(steps * n, k))
    return torch.nanmean(var.view(steps, n, k), dim=1)


def run(variances: torch.Tensor, config: DriftConfig | None = None):
    monitor, controller = DriftMonitor(K, config), DriftController(K, config)
    history = []
    for v in variances:
        m_state = monitor.update(v)
        history.append((m_state, controller.update(m_state)))
    return monitor, controller, history


def test_stationary_noise_has_no_false_positives() -> None:
    """1,000 steps of stationary noise (N = 32 groups of G = 8, seeded): no correction at all."""
    variances = step_variances(*simulated_steps(0, 1000))
    _, controller, history = run(variances)
    ready = [m for m, _ in history if m.ready]
    triggers = sum(c.active for _, c in history)
    rate = triggers / len(ready)
    max_d = max(m.drift for m in ready)
    max_g = max(max(m.growth) for m in ready)
    print(f"stationary: {triggers} corrections in {len(ready)} steps (rate {rate:.2%}), "
          f"max D = {max_d:.4g}, τ_D = {history[-1][1].threshold:.4g}, "
          f"max growth = {max_g:.3g}")  # fmt: skip
    assert triggers == 0
    assert max_d < DriftConfig().threshold
    assert max_g < DriftConfig().growth_threshold  # each condition alone is quiet on noise
    assert controller.state.weights == (1.0, 1.0, 1.0)
    assert controller.beta == DriftConfig().beta and controller.clip_eps == DriftConfig().clip_eps


def drifting_growth(steps: int, start: int, stop: int | None = None) -> torch.Tensor:
    """Axis 0's scale grows 2 % per step from `start` (until `stop`, then back to 1)."""
    growth = torch.ones(steps, K, dtype=torch.float64)
    t = torch.arange(steps, dtype=torch.float64)
    growth[:, 0] = 1 + 0.02 * (t - start).clamp_min(0)
    if stop is not None:
        growth[stop:, 0] = 1.0
    return growth


def test_single_axis_drift_triggers_and_corrects() -> None:
    config = DriftConfig()
    start, steps = 40, 120
    variances = step_variances(*simulated_steps(1, steps, growth=drifting_growth(steps, start)))
    _, controller, history = run(variances, config)
    first = next(t for t, (_, c) in enumerate(history) if c.active)
    print(f"drift from step {start}: first correction at step {first}")
    # ŝ is bilinear in the embedding, so axis 0's variance grows as (1 + 0.02 t)⁴ and doubles
    # after ~9.5 steps; the EMA lags ~(1 − r)/r = 9 steps more: the bound leaves 10 of slack
    assert start + 9 < first <= start + 30
    m_state, c_state = history[first]
    assert m_state.over_exploited == 0 and m_state.drift > config.threshold
    assert m_state.growth[0] >= config.growth_threshold and c_state.growth == m_state.growth[0]
    assert c_state.weights[0] < 1.0 < min(c_state.weights[1:])
    assert c_state.beta > config.beta and c_state.clip_eps < config.clip_eps
    final = controller.state
    assert final.weights[0] == pytest.approx(config.weight_min)  # sustained drift: at the bound
    assert math.fsum(final.weights) == pytest.approx(K)
    assert config.beta < final.beta <= config.beta_max
    assert config.clip_eps_min <= final.clip_eps < config.clip_eps


def test_decay_back_to_baseline_after_drift_stops() -> None:
    config = DriftConfig()
    steps, start, stop = 400, 40, 90
    growth = drifting_growth(steps, start, stop)
    _, controller, history = run(step_variances(*simulated_steps(2, steps, growth=growth)), config)
    assert any(c.active for _, c in history[start:stop])
    last_active = max(t for t, (_, c) in enumerate(history) if c.active)
    assert last_active < stop + 60  # the EMA forgets the drift
    quiet = steps - 1 - last_active
    f = math.exp(-config.decay_rate * quiet)
    s = controller.state
    for w in s.weights:  # deviations shrink exactly by exp(−decay_rate) per quiet step
        assert abs(w - 1) <= (config.weight_max - 1) * f + 1e-12
    assert 0 <= s.beta - config.beta <= (config.beta_max - config.beta) * f + 1e-12
    assert 0 <= config.clip_eps - s.clip_eps <= (config.clip_eps - config.clip_eps_min) * f + 1e-12
    assert max(abs(w - 1) for w in s.weights) < 1e-3


def shrinking_growth(steps: int, start: int, axis: int = 0) -> torch.Tensor:
    """Axis `axis`'s scale shrinks 3 % per step from `start` down to 0.1: the policy converges on
    that axis (its answers agree), the others are untouched."""
    growth = torch.ones(steps, K, dtype=torch.float64)
    t = torch.arange(steps, dtype=torch.float64)
    growth[:, axis] = (1 - 0.03 * (t - start).clamp_min(0)).clamp_min(0.1)
    return growth


def test_convergence_on_one_axis_is_not_drift() -> None:
    """One axis is solved (its spread shrinks ~100×): the other axes' shares rise and D(t) climbs
    far past τ_D, but no axis's own spread grows, so the controller stays quiet. The share rule
    alone (growth_threshold = 0) fires on the same data: the growth condition is what separates."""
    config = DriftConfig()
    steps = 300
    variances = step_variances(*simulated_steps(8, steps, growth=shrinking_growth(steps, 40)))
    _, controller, history = run(variances, config)
    ready = [m for m, _ in history if m.ready]
    max_d, max_g = max(m.drift for m in ready), max(max(m.growth) for m in ready)
    print(f"convergence: max D = {max_d:.3g}, max growth = {max_g:.3g}")
    assert max_d > 10 * config.threshold  # the shares did shift, a lot
    assert max_g < config.growth_threshold
    assert controller.state.corrections == 0 and controller.state.weights == (1.0,) * K
    _, shares_only, _ = run(variances, replace(config, growth_threshold=0.0))
    assert shares_only.state.corrections > 0


def test_uniform_growth_is_not_drift() -> None:
    """Every axis's spread grows alike (e.g. a hotter sampler): big growth, no tilt, no action."""
    steps = 150
    growth = torch.ones(steps, K, dtype=torch.float64) * drifting_growth(steps, 40)[:, :1]
    _, controller, history = run(step_variances(*simulated_steps(9, steps, growth=growth)))
    assert max(history[-1][0].growth) > 4 * DriftConfig().growth_threshold
    assert controller.state.corrections == 0


def test_growth_hand_computed() -> None:
    """v̄ is the EMA of the absolute variances, v(0) their baseline mean, g = v̄ / v(0)."""
    config = DriftConfig(ema_rate=0.5, baseline_steps=2, threshold=0.01, noise_multiplier=0.0)
    monitor, controller = DriftMonitor(2, config), DriftController(2, config)
    monitor.update([1.0, 2.0])
    s = monitor.update([3.0, 2.0])  # EMA (2, 2); baseline (2, 2)
    assert s.variance == (2.0, 2.0) and s.variance_baseline == (2.0, 2.0)
    assert s.growth == (1.0, 1.0)
    s = monitor.update([4.0, 0.5])  # EMA (3, 1.25): axis 0 grew 1.5×, shares tilted
    assert s.variance == pytest.approx((3.0, 1.25)) and s.growth == pytest.approx((1.5, 0.625))
    assert s.over_exploited == 0 and s.drift > config.threshold
    assert not controller.update(s).active  # tilt, but 1.5 < 2: no correction
    s = monitor.update([7.0, 0.5])  # EMA (5, 0.875): 2.5×
    c = controller.update(s)
    assert s.growth == pytest.approx((2.5, 0.4375)) and c.active and c.growth == pytest.approx(2.5)
    zero = DriftMonitor(2, config)  # an axis with no spread at all in the baseline
    zero.update([0.0, 1.0])
    zero.update([0.0, 1.0])
    s = zero.update([1.0, 1.0])
    assert s.growth[0] == pytest.approx(0.5 / (config.kl_eps * 1.0)) and s.over_exploited == 0


def test_controller_decay_is_exponential() -> None:
    config = DriftConfig()
    controller = DriftController(K, config)
    controller.state = ControlState(weights=(0.6, 1.2, 1.2), beta=0.05, clip_eps=0.15)
    quiet = MonitorState(step=30, alpha=(0.3, 0.3, 0.4), baseline=(0.3, 0.3, 0.4), drift=0.0)
    for _ in range(10):
        controller.update(quiet)
    f = math.exp(-10 * config.decay_rate)
    s = controller.state
    assert s.weights == pytest.approx((1 - 0.4 * f, 1 + 0.2 * f, 1 + 0.2 * f))
    assert s.beta == pytest.approx(config.beta + (0.05 - config.beta) * f)
    assert s.clip_eps == pytest.approx(config.clip_eps + (0.15 - config.clip_eps) * f)
    assert not s.active


def test_monitor_hand_computed() -> None:
    config = DriftConfig(ema_rate=0.5, baseline_steps=2)
    monitor = DriftMonitor(2, config)
    s = monitor.update([1.0, 3.0])  # shares (0.25, 0.75)
    assert not s.ready and math.isnan(s.drift) and s.alpha == (0.25, 0.75)
    s = monitor.update([3.0, 1.0])  # shares (0.75, 0.25); EMA (0.5, 0.5); baseline (0.5, 0.5)
    assert s.ready and s.baseline == (0.5, 0.5) and s.alpha == (0.5, 0.5) and s.drift == 0.0
    s = monitor.update([9.0, 1.0])  # shares (0.9, 0.1); EMA (0.7, 0.3)
    assert s.alpha == pytest.approx((0.7, 0.3))
    assert s.drift == pytest.approx(0.7 * math.log(1.4) + 0.3 * math.log(0.6))
    assert s.ratio == pytest.approx((1.4, 0.6)) and s.over_exploited == 0
    s = monitor.update([math.nan, 1.0])  # nothing to share out: skipped
    assert s.skipped == 1 and s.step == 3 and s.alpha == pytest.approx((0.7, 0.3))
    s = monitor.update([0.0, 0.0])
    assert s.skipped == 2 and s.step == 3


def test_kl_divergence() -> None:
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    p, q = [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]
    assert kl_divergence(p, q) == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    )
    assert math.isfinite(kl_divergence([1.0, 0.0], [0.0, 1.0]))  # floored, not inf


def test_no_correction_before_baseline() -> None:
    controller = DriftController(K)
    state = MonitorState(step=1, alpha=(0.9, 0.05, 0.05), drift=math.nan)
    s = controller.update(state)
    assert s.weights == (1.0,) * K and not s.active and s.corrections == 0
    assert s.beta == DriftConfig().beta and s.clip_eps == DriftConfig().clip_eps


drift_states = st.builds(
    lambda d, worst, g: MonitorState(
        step=50,
        alpha=(1 / 3,) * K,
        baseline=(1 / 3,) * K,
        drift=d,
        over_exploited=worst,
        growth=tuple(g if i == worst else 1.0 for i in range(K)),
    ),
    st.floats(0.0, 0.2),
    st.integers(0, K - 1),
    st.floats(0.0, 4.0),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(drift_states, min_size=1, max_size=60), st.floats(0.0, 0.5), st.floats(0.0, 0.3))
def test_bounds_always_hold(states: list[MonitorState], step: float, lo_gap: float) -> None:
    config = DriftConfig(weight_step=step, weight_min=1 - lo_gap - 0.2, weight_max=1.2 + lo_gap)
    controller = DriftController(K, config)
    for m_state in states:
        s = controller.update(m_state)
        assert all(config.weight_min - 1e-12 <= w <= config.weight_max + 1e-12 for w in s.weights)
        assert math.fsum(s.weights) / K == pytest.approx(1.0, abs=1e-9)
        assert config.beta <= s.beta <= config.beta_max
        assert config.clip_eps_min <= s.clip_eps <= config.clip_eps
        growth = m_state.growth[m_state.over_exploited]
        assert s.active == (m_state.drift > config.threshold and growth >= 2.0)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-3.0, 5.0), min_size=1, max_size=6),
    st.floats(0.0, 1.0),
    st.floats(1.0, 3.0),
)
def test_project_weights_is_the_projection(raw: list[float], lo: float, hi: float) -> None:
    m = project_weights(raw, lo, hi)
    assert all(lo - 1e-12 <= w <= hi + 1e-12 for w in m)
    assert math.fsum(m) / len(m) == pytest.approx(1.0, abs=1e-9)
    # KKT: m = clip(raw + s) for one shift s shared by every coordinate strictly inside the box.
    shifts = [w - r for w, r in zip(m, raw, strict=True) if lo + 1e-9 < w < hi - 1e-9]
    assert max(shifts, default=0.0) - min(shifts, default=0.0) < 1e-9
    assert project_weights(m, lo, hi) == pytest.approx(m, abs=1e-9)  # idempotent


def test_state_round_trips_through_json() -> None:
    """Stop at any step (also mid-baseline), save as JSON, resume: identical to not stopping."""
    growth = drifting_growth(80, 15)
    variances = step_variances(*simulated_steps(3, 80, n=8, growth=growth))
    config = DriftConfig(baseline_steps=10, threshold=0.01)
    for cut in (5, 40):
        ref_monitor, ref_controller, _ = run(variances, config)
        monitor, controller, _ = run(variances[:cut], config)
        saved = json.dumps(
            {"m": monitor.state_dict(), "c": controller.state_dict()}, allow_nan=False
        )
        monitor2, controller2 = DriftMonitor(K, config), DriftController(K, config)
        loaded = json.loads(saved)
        monitor2.load_state_dict(loaded["m"])
        controller2.load_state_dict(loaded["c"])
        assert monitor2.state == monitor.state or math.isnan(monitor.state.drift)
        for v in variances[cut:]:
            controller2.update(monitor2.update(v))
        assert monitor2.state == ref_monitor.state
        assert controller2.state == ref_controller.state
        assert ref_controller.state.corrections > 0
    with pytest.raises(ValueError):
        DriftMonitor(K + 1).load_state_dict(monitor.state_dict())


def test_noop_twin_is_constant() -> None:
    growth = drifting_growth(100, 20)
    variances = step_variances(*simulated_steps(4, 100, n=8, growth=growth))
    monitor, noop, active = DriftMonitor(K), NoOpDriftController(K), DriftController(K)
    for v in variances:
        m_state = monitor.update(v)
        s = noop.update(m_state)
        active.update(m_state)
        assert s.weights == (1.0,) * K and not s.active and s.corrections == 0
        assert s.beta == DriftConfig().beta and s.clip_eps == DriftConfig().clip_eps
    assert active.state.corrections > 0  # the same inputs do move the real controller
    assert torch.equal(noop.weights, torch.ones(K))
    restored = NoOpDriftController(K)
    restored.load_state_dict(json.loads(json.dumps(noop.state_dict())))
    assert restored.state.weights == noop.state.weights and restored.beta == noop.beta


def test_monitor_from_scores_equals_monitor_from_variance_sums() -> None:
    """Service telemetry keeps, per axis, Σ over groups of Var_i(λ_l ŝ_l) and the group count,
    possibly split over replicas. Recomputed here with loops from sums and sums of squares."""
    scores, lam = simulated_steps(5, 30, n=6, g=5, growth=drifting_growth(30, 5))
    scores[:, 0, 1] = math.nan  # an unscored response
    scores[:, 1, :4] = math.nan  # a group with one scored response: no variance
    config = DriftConfig(baseline_steps=5, threshold=0.01)
    local, remote = DriftMonitor(K, config), DriftMonitor(K, config)
    for t in range(scores.shape[0]):
        local.update_from_group_scores(scores[t], lam[t])
        replicas = []
        for part in (range(0, 2), range(2, 6)):  # two servers saw different groups
            sums, counts = [0.0] * K, [0] * K
            for x in part:
                for ell in range(K):
                    vals = [float(lam[t, x, ell] * v) for v in scores[t, x, :, ell].tolist()]
                    vals = [v for v in vals if not math.isnan(v)]
                    if len(vals) >= 2:
                        mean = sum(vals) / len(vals)
                        sums[ell] += sum(v * v for v in vals) / len(vals) - mean * mean
                        counts[ell] += 1
            replicas.append((sums, counts))
        merged_sums = [a + b for a, b in zip(replicas[0][0], replicas[1][0], strict=True)]
        merged_counts = [a + b for a, b in zip(replicas[0][1], replicas[1][1], strict=True)]
        assert merged_counts == [5] * K
        remote.update_from_variance_sums(merged_sums, merged_counts)
    a, b = local.state, remote.state
    assert a.step == b.step == 30 and a.ready
    assert b.alpha == pytest.approx(a.alpha, rel=1e-9)
    assert b.baseline == pytest.approx(a.baseline, rel=1e-9)
    assert b.drift == pytest.approx(a.drift, rel=1e-7)
    assert b.variance == pytest.approx(a.variance, rel=1e-9)
    assert b.variance_baseline == pytest.approx(a.variance_baseline, rel=1e-9)
    assert b.growth == pytest.approx(a.growth, rel=1e-9) and a.over_exploited == b.over_exploited


def test_config_validation() -> None:
    for bad in (
        {"ema_rate": 0.0},
        {"baseline_steps": 0},
        {"threshold": 0.0},
        {"weight_min": 1.1},
        {"weight_max": 0.9},
        {"beta": 0.2, "beta_max": 0.1},
        {"clip_eps": 0.05, "clip_eps_min": 0.1},
        {"decay_rate": -1.0},
        {"growth_threshold": -0.5},
    ):
        with pytest.raises(ValueError):
            DriftConfig(**bad)
    with pytest.raises(ValueError):
        DriftMonitor(K).update([1.0, 2.0])  # wrong K


def test_log_dicts() -> None:
    monitor = DriftMonitor(2, DriftConfig(ema_rate=1.0, baseline_steps=1, threshold=0.01))
    controller = DriftController(2, monitor.config)
    m_state = monitor.update([1.0, 1.0])
    m_state = monitor.update([3.0, 1.0])
    c_state = controller.update(m_state)
    logs = {**m_state.log_dict(), **c_state.log_dict()}
    assert logs["drift/D"] == m_state.drift > 0.01 and logs["drift/active"] == 1.0
    assert logs["drift/threshold"] == 0.01 and logs["drift/noise_floor"] == 0.0  # B = 1
    assert logs["drift/alpha0_0"] == 0.5 and logs["drift/alpha_0"] == 0.75
    assert logs["drift/growth_0"] == logs["drift/growth_max"] == 3.0 and logs["drift/var_1"] == 1.0
    assert logs["drift/m_0"] < 1 < logs["drift/m_1"] and logs["drift/beta"] > DriftConfig().beta
    assert all(isinstance(v, float) for v in logs.values())


def test_noise_floor_hand_computed() -> None:
    config = DriftConfig(ema_rate=0.5, baseline_steps=3, noise_multiplier=10.0, threshold=0.01)
    monitor = DriftMonitor(2, config)
    for v in ([1.0, 1.0], [3.0, 1.0], [1.0, 3.0]):  # shares .5, .75, .25 on axis 0
        s = monitor.update(v)
    assert s.baseline == pytest.approx((0.5, 0.5))
    var = (0.0 + 0.0625 + 0.0625) / 2  # ddof = 1, the same on both axes
    expected = 0.5 * (0.5 / 1.5 + 1 / 3) * (var / 0.5 + var / 0.5)
    assert s.noise_floor == pytest.approx(expected)
    controller = DriftController(2, config)
    assert controller.threshold(s) == pytest.approx(max(0.01, 10 * expected))
    off = DriftController(2, replace(config, noise_multiplier=0.0))
    assert off.threshold(s) == 0.01
    assert math.isnan(controller.threshold(MonitorState()))  # no baseline yet


def test_noise_multiplier_protects_small_batches() -> None:
    """With N = 8 groups of G = 8 a fixed τ_D = 0.02 fires on pure noise; the noise-scaled τ_D
    does not, and it still catches the injected drift."""
    variances = step_variances(*simulated_steps(6, 1000, n=8))
    fixed = DriftConfig(noise_multiplier=0.0, growth_threshold=0.0)  # τ_D alone
    _, _, hist_fixed = run(variances, fixed)
    _, _, hist_scaled = run(variances)
    fp_fixed = sum(c.active for _, c in hist_fixed) / 980
    fp_scaled = sum(c.active for _, c in hist_scaled) / 980
    print(f"N=8, G=8 stationary: false-positive rate {fp_fixed:.2%} (fixed τ_D), "
          f"{fp_scaled:.2%} (noise-scaled τ_D = {hist_scaled[-1][1].threshold:.4f})")  # fmt: skip
    assert fp_fixed > 0.01 > fp_scaled  # stated bound: under 1 % (measured: 0.3 % at seed 6)
    _, _, hist_default = run(variances, DriftConfig())  # both guards, the default
    assert not any(c.active for _, c in hist_default)
    growth = drifting_growth(150, 40)
    _, _, hist = run(step_variances(*simulated_steps(7, 150, n=8, growth=growth)))
    first = next(t for t, (_, c) in enumerate(hist) if c.active)
    assert 40 < first <= 40 + 40 and hist[first][0].over_exploited == 0
