"""benchmarks/lm_compare/oracle.py: the detection-bypassing ablations against hand-applied steps."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lm_compare.oracle import (
    LateDropController,
    OracleController,
    controller_factory,
    drop_weights,
)
from gprl_core.advantages import gprl_advantages
from gprl_core.drift import DriftMonitor, drift_config
from gprl_core.drift_loop import DriftLoop, GPRLState


def test_drop_weights_zero_one_axis_and_keep_mean_one() -> None:
    assert drop_weights(4, 3) == [4 / 3, 4 / 3, 4 / 3, 0.0]
    assert drop_weights(2, 0) == [0.0, 2.0]
    for k, axis in ((1, 0), (3, 3), (3, -1)):
        with pytest.raises(ValueError):
            drop_weights(k, axis)


def test_oracle_corrects_the_named_axis_every_step_after_the_baseline() -> None:
    """Constant variances (D = 0: the paper rule alone never fires); the oracle still applies
    the paper's step on axis 2 from the step the baseline is in, written out by hand."""
    c = drift_config("paper", baseline_steps=2, beta=0.04, clip_eps=0.2)
    monitor, oracle = DriftMonitor(3, c), OracleController(3, c, axis=2)
    eta, m, beta, eps = c.weight_step, [1.0, 1.0, 1.0], c.beta, c.clip_eps
    for step in range(1, 6):
        state = oracle.update(monitor.update([0.2, 0.5, 0.3]))
        assert monitor.state.drift == pytest.approx(0.0) or step < 2
        if step < 2:
            assert not state.active and list(state.weights) == [1.0, 1.0, 1.0]
            continue
        m = [m[0] + eta / 2, m[1] + eta / 2, m[2] - eta]  # mean 1, in bounds: no projection
        beta += c.beta_rate * (c.beta_max - beta)
        eps -= c.clip_rate * (eps - c.clip_eps_min)
        assert state.active and state.corrections == step - 1
        assert list(state.weights) == pytest.approx(m)
        assert (state.beta, state.clip_eps) == pytest.approx((beta, eps))
    with pytest.raises(ValueError, match="oracle axis 3"):
        OracleController(3, c, axis=3)


def test_late_drop_switches_the_axis_off_once_the_baseline_is_in() -> None:
    """gprl_drop_late: m = 1 while the monitor builds its baseline, then gprl_drop's m for good,
    whatever D does; β and ε never move."""
    c = drift_config("paper", baseline_steps=2, ema_rate=0.5, beta=0.04, clip_eps=0.2)
    monitor, late = DriftMonitor(3, c), LateDropController(3, c, axis=1)
    ready, weights = [], []
    for var in ([0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.2, 0.5, 0.3]):
        ms = monitor.update(var)
        state = late.update(ms)
        ready.append(ms.ready)
        weights.append(list(state.weights))
        assert (state.beta, state.clip_eps) == (0.04, 0.2)
        assert (state.active, state.corrections) == ((True, 1) if ms.ready else (False, 0))
    assert ready == [False, True, True, True]
    assert weights == [[1.0, 1.0, 1.0]] + [[1.5, 0.0, 1.5]] * 3
    assert isinstance(controller_factory("gprl_drop_late", 1)(3, c), LateDropController)


@pytest.mark.parametrize(("arm", "after"), [("gprl_drop_from2", 1), ("gprl_drop_from3", 2)])
def test_drop_from_step_switches_after_a_fixed_count_of_steps(arm: str, after: int) -> None:
    """gprl_drop_from2/3: m = 1 for the first `after` steps, then gprl_drop's m for good, long
    before the monitor's 4-step baseline is in; an unscored step still counts as a step."""
    c = drift_config("paper", baseline_steps=4, ema_rate=0.5, beta=0.04, clip_eps=0.2)
    monitor, ctl = DriftMonitor(3, c), controller_factory(arm, 2)(3, c)
    weights = []
    for var in ([0.2, 0.5, 0.3], [0.0, 0.0, 0.0], [0.9, 0.05, 0.05], [0.2, 0.5, 0.3]):
        state = ctl.update(monitor.update(var))
        weights.append(list(state.weights))
        assert (state.beta, state.clip_eps) == (0.04, 0.2)
    assert not monitor.state.ready and monitor.state.skipped == 1
    in_training = [[1.0, 1.0, 1.0], *weights[:-1]]  # step t trains with the m set after t - 1
    assert in_training == [[1.0, 1.0, 1.0]] * after + [[1.5, 1.5, 0.0]] * (4 - after)
    with pytest.raises(ValueError, match="step count"):
        LateDropController(3, c, axis=2, after=0)


def test_gprl_drop_is_the_axis_prior_and_the_oracle_arms_build_through_the_factory() -> None:
    """gprl_drop is `DriftConfig.axis_prior` with the controller off: m = drop_weights before
    the first step and after every step; the other oracle arms install their controller."""
    from benchmarks.lm_compare.oracle import CONTROLLERS, ORACLE_ARMS, PRIOR_ARMS

    assert set(ORACLE_ARMS) == set(PRIOR_ARMS) | set(CONTROLLERS) and "gprl_drop" in PRIOR_ARMS
    gen = torch.Generator().manual_seed(0)
    state = GPRLState()
    config = drift_config("paper", baseline_steps=1, axis_prior=tuple(drop_weights(2, 1)))
    loop = DriftLoop(state, config, enabled=False)
    assert state.weights.tolist() == [2.0, 0.0]
    emb = torch.randn(3, 4, 4, generator=gen)
    state.last = gprl_advantages(emb, torch.full((3, 2), 0.5), state.weights)
    loop.update(1)
    assert state.weights.tolist() == [2.0, 0.0] and not loop.controller.state.active
    # the advantage with m_1 = 0 is axis 0's term alone, at weight 2
    only0 = gprl_advantages(emb, torch.full((3, 2), 0.5), torch.tensor([1.0, 0.0]))
    assert torch.allclose(state.last.advantages, 2 * only0.advantages)


def test_oracle_arms_other_than_the_prior_get_their_controller_from_the_factory() -> None:
    loop = DriftLoop(GPRLState(), drift_config("paper", baseline_steps=1), enabled=False)
    loop.controller_factory = controller_factory("gprl_oracle", 1)
    loop.state.last = gprl_advantages(torch.randn(3, 4, 4), torch.full((3, 2), 0.5))
    loop.update(1)
    assert isinstance(loop.controller, OracleController) and loop.controller.axis == 1
