"""Ablations that bypass the drift monitor's detection, to measure what the correction could do.

Both arms need the exploited axis named up front (`lm_compare --oracle-axis L`), which only a
constructed verifier can give (axis 3 of benchmarks/lm_compare/length_axis_verifier.py is pure
length):

- `gprl_oracle`: per-dimension GPRL with the paper controller's correction (m, β, ε steps as in
  `drift_config("paper")`) applied on axis L at every step once the monitor's baseline is in,
  whatever D says: the paper's correction with perfect detection;
- `gprl_drop`: per-dimension GPRL with m fixed from the first step: m_L = 0, every other axis
  K/(K−1) (mean(m) = 1, as the controller keeps it); β and ε stay at their baselines: the most
  that reweighting alone can do against axis L. It is the learner's own `DriftConfig.axis_prior`
  (`gprl_core.length_audit.prior_weights`) with the controller off, not a controller of its own;
- `gprl_drop_late`: m = 1 until the monitor's baseline is in, then m fixed at `gprl_drop`'s
  from the step where `gprl_oracle` makes its first correction: the same switch, as late as a
  detector could act, to tell the size of a correction from its timing;
- `gprl_drop_from2`, `gprl_drop_from3`: the same switch after training step 1 or 2 (m_L = 0 in
  training from step 2 or 3 on): how early a detector would have to act.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from gprl_core.drift import ControlState, DriftConfig, DriftController, NoOpDriftController
from gprl_core.drift_monitor import MonitorState
from gprl_core.length_audit import prior_weights


def drop_weights(k: int, axis: int) -> list[float]:
    """m with axis `axis` at 0 and the rest equal, mean(m) = 1."""
    return prior_weights(k, [axis])


class OracleController(DriftController):
    """The paper's correction on a fixed axis at every step after the baseline."""

    def __init__(self, k: int, config: DriftConfig, axis: int) -> None:
        if not 0 <= axis < k:
            raise ValueError(f"oracle axis {axis} is not one of the verifier's {k} axes")
        self.axis = axis
        super().__init__(k, config)

    def triggered(self, monitor_state: MonitorState) -> bool:
        return monitor_state.ready

    def update(self, monitor_state: MonitorState) -> ControlState:
        return super().update(replace(monitor_state, over_exploited=self.axis))


class LateDropController(NoOpDriftController):
    """m = 1 until the monitor is ready (or, with `after`, until that many steps are in), then
    `drop_weights(k, axis)` for good (entered as one correction); β and ε at their baselines."""

    def __init__(self, k: int, config: DriftConfig, axis: int, after: int | None = None) -> None:
        if after is not None and after < 1:
            raise ValueError(f"after must be a step count >= 1, got {after}")
        self.fixed = tuple(drop_weights(k, axis))
        self.after = after
        self.updates = 0  # training steps seen (the monitor's own count skips unscored steps)
        super().__init__(k, config)

    def update(self, monitor_state: MonitorState) -> ControlState:
        state = super().update(monitor_state)
        self.updates += 1
        switched = monitor_state.ready if self.after is None else self.updates >= self.after
        if switched:
            self.state = replace(state, weights=self.fixed, active=True, corrections=1)
        return self.state


PRIOR_ARMS: tuple[str, ...] = ("gprl_drop",)  # m = drop_weights as DriftConfig.axis_prior
# oracle arm -> its controller, built as (k, config, axis)
CONTROLLERS: dict[str, Callable[..., Any]] = {
    "gprl_oracle": OracleController,
    "gprl_drop_late": LateDropController,
    "gprl_drop_from2": partial(LateDropController, after=1),
    "gprl_drop_from3": partial(LateDropController, after=2),
}
ORACLE_ARMS: tuple[str, ...] = (*PRIOR_ARMS, *CONTROLLERS)  # the one list of oracle arms


def controller_factory(arm: str, axis: int) -> Any:
    """The `DriftLoop.controller_factory` for an oracle arm."""
    build = CONTROLLERS[arm]
    return lambda k, config: build(k, config, axis)
