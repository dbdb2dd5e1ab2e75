"""`GPRLPPOTrainer`: OpenRLHF 0.11.2's `PPOTrainer` with GPRL advantages and the drift loop.

OpenRLHF's `PPOTrainer` is a Ray actor class (`@ray.remote`), which cannot be subclassed as
such: the plain class (`__ray_actor_class__`) is subclassed and wrapped with `ray.remote` again.
The launcher (`gprl_client.openrlhf.launcher`) puts `GPRLTrainerFactory` where
`openrlhf.cli.train_ppo_ray` looks up `PPOTrainer`, so the GPRL options travel to the trainer
actor as a constructor argument.

Changes to the base trainer, nothing else:
- `self.experience_maker` is a `GPRLExperienceMaker` sharing a `GPRLState` with the drift loop;
- `ppo_train` first runs the drift loop (β → `kl_ctl.value`, ε → the policy actors' loss, m →
  next step's advantages) and adds `gprl/...` keys (D, α, m, β, ε, per-axis statistics) to the
  step's status, which OpenRLHF logs to the console, wandb and tensorboard;
- `fit` writes the drift report (JSON + plot) when training ends, and the JSON every step;
- the drift state (monitor, controller) is saved in OpenRLHF's checkpoint client states and
  restored on `--ckpt.load_enable` (the clip ε reaches the actors again at the next step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
from openrlhf.trainer import ppo_trainer as _ppo

from gprl_client.openrlhf.drift_loop import OpenRLHFDriftLoop
from gprl_client.openrlhf.experience_maker import GPRLExperienceMaker
from gprl_core.drift import DriftConfig, drift_config
from gprl_core.drift_loop import GPRLState

log = logging.getLogger(__name__)

_BasePPOTrainer = getattr(_ppo.PPOTrainer, "__ray_actor_class__", _ppo.PPOTrainer)


def drift_loop_from(args: Any, options: dict[str, Any]) -> OpenRLHFDriftLoop:
    """Build the loop; β₀ and ε₀ are OpenRLHF's own `--algo.kl.init_coef` and clip settings."""
    low, high = args.actor.eps_clip_low_high or (args.actor.eps_clip, args.actor.eps_clip)
    drift = dict(options.get("drift", {}))
    drift.update(beta=float(args.algo.kl.init_coef), clip_eps=float(low))
    drift.setdefault("beta_max", max(DriftConfig.beta_max, 10 * float(args.algo.kl.init_coef)))
    drift.setdefault("clip_eps_min", min(DriftConfig.clip_eps_min, float(low)))
    state = GPRLState(normalization=options.get("normalization", "per_dimension"))
    return OpenRLHFDriftLoop(
        state,
        drift_config(options.get("drift_preset", "project"), **drift),
        enabled=bool(options.get("drift_control", True)),
        clip_high_ratio=float(high) / float(low) if low else 1.0,
    )


class GPRLPPOTrainerImpl(_BasePPOTrainer):  # type: ignore[misc, valid-type]
    """The plain class; `GPRLPPOTrainer` below is its Ray actor."""

    def __init__(self, *args: Any, gprl_options: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gprl_options = dict(gprl_options or {})
        self.drift_loop = drift_loop_from(self.args, self.gprl_options)
        self.experience_maker = GPRLExperienceMaker(
            self.actor_model_group,
            self.critic_model_group,
            self.reward_model_group,
            self.reference_model_group,
            self.kl_ctl,
            self.strategy,
            self.tokenizer,
            gprl_state=self.drift_loop.state,
        )

    def report_dir(self) -> Path:
        where = self.gprl_options.get("report_dir")
        return Path(where) if where else Path(self.args.ckpt.output_dir) / "gprl_drift"

    def ppo_train(self, global_steps: int) -> dict[str, Any]:
        gprl_status = self.drift_loop.step(self.kl_ctl, self.actor_model_group, global_steps)
        status = super().ppo_train(global_steps)
        status.update(gprl_status)
        self.drift_loop.write_report(self.report_dir(), plot=False)  # survives a crash
        return status

    def save_logs_and_checkpoints(self, global_step: int, logs_dict=None, client_states=None):
        # The drift state rides in OpenRLHF's checkpoint client states (resume: same m, β, ε).
        client_states = dict(client_states or {}, gprl_drift=self.drift_loop.state_dict())
        return super().save_logs_and_checkpoints(global_step, logs_dict, client_states)

    def init_checkpoint_states(self) -> dict[str, Any]:
        states = super().init_checkpoint_states()
        if states.get("gprl_drift"):
            self.drift_loop.load_state_dict(states["gprl_drift"])
            control = self.drift_loop.controller
            if control is not None:
                self.kl_ctl.value = control.beta
        return states

    def fit(self, global_step: int = 0) -> None:
        try:
            super().fit(global_step)
        finally:
            path = self.drift_loop.write_report(self.report_dir())
            log.info("GPRL drift report: %s", path)


GPRLPPOTrainer = ray.remote(GPRLPPOTrainerImpl)


class GPRLTrainerFactory:
    """Stands in for `PPOTrainer` in `train_ppo_ray`: `.remote(...)` starts the GPRL trainer
    actor with the GPRL options appended (Ray pickles the class by reference, hence the
    package must be importable on every node: see the launcher)."""

    def __init__(self, gprl_options: dict[str, Any]) -> None:
        self.gprl_options = gprl_options

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return GPRLPPOTrainer.remote(*args, gprl_options=self.gprl_options, **kwargs)
