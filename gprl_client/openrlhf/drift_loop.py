"""The drift loop applied to OpenRLHF's objects; the loop itself is `gprl_core.drift_loop`.

`OpenRLHFDriftLoop.step` runs the shared loop once per training step, then
β → `kl_ctl.value` (OpenRLHF reads it for the KL loss / penalty of this step's update) and
ε → every policy actor's `trainer.actor_loss_fn.clip_eps_low/high` through Ray's `__ray_call__`.
With asymmetric clipping (`--actor.eps_clip_low_high LOW HIGH`) both bounds are scaled by ε/ε₀
(ε₀ = LOW, the baseline the controller starts from). `DriftLoop` stays this class's old name.
"""

from __future__ import annotations

from typing import Any

from gprl_core.drift_loop import DriftLoop as _SharedDriftLoop
from gprl_core.drift_loop import GPRLState, plot_history

__all__ = ["DriftLoop", "GPRLState", "OpenRLHFDriftLoop", "plot_history", "set_clip_eps"]


def set_clip_eps(actor: Any, low: float, high: float) -> tuple[float, float]:
    """Runs *inside* a policy actor (via `__ray_call__`): set the PPO clip of its loss."""
    loss = actor.trainer.actor_loss_fn
    loss.clip_eps_low, loss.clip_eps_high = low, high
    return loss.clip_eps_low, loss.clip_eps_high


def _wait(refs: list[Any]) -> list[Any]:
    import ray  # only the OpenRLHF path needs it

    return [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in refs]


class OpenRLHFDriftLoop(_SharedDriftLoop):
    """The shared drift loop plus `step`, which hands β and ε to OpenRLHF's objects."""

    def step(self, kl_ctl: Any, actor_group: Any, global_step: int) -> dict[str, float]:
        """`update`, then β → `kl_ctl.value` and ε → the policy actors' loss."""
        cstate, status = self.update(global_step)
        if cstate is None:
            return status
        kl_ctl.value = cstate.beta
        low, high = cstate.clip_eps, cstate.clip_eps * self.clip_high_ratio
        if actor_group is not None:
            handles = getattr(actor_group, "_actor_handlers", [])
            _wait([h.__ray_call__.remote(set_clip_eps, low, high) for h in handles])
        return status


DriftLoop = OpenRLHFDriftLoop
