"""The per-step drift loop, shared by the trainers (TRL adapter, OpenRLHF trainer): no trainer,
Ray or HTTP import, so it can be tested on its own.

Once per training step, after GPRL advantages were computed and before the policy update:

1. `DriftMonitor.update(mean over groups of Var_i(λ_l ŝ_l))` → α(t), D(t);
2. `DriftController.update(...)` → m, β, ε;
3. m → the shared `GPRLState`, used for the *next* step's advantages (this step's are computed);
   β and ε are returned in the control state for the trainer to apply (OpenRLHF:
   `gprl_client.openrlhf.drift_loop.OpenRLHFDriftLoop.step`; TRL: `gprl_client.adapters.trl`).

Everything logged goes into the step's status (`gprl/...` keys) and a history that
`write_report` saves as JSON (+ a PNG plot when the optional matplotlib is installed).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gprl_core.advantages import GPRLAdvantages
from gprl_core.drift import (
    ControlState,
    DriftConfig,
    DriftController,
    DriftMonitor,
    NoOpDriftController,
)

log = logging.getLogger(__name__)

ControllerFactory = Callable[[int, DriftConfig], DriftController | NoOpDriftController]


class GPRLState:
    """What the experience maker and the trainer share in the trainer's process: the weights
    m to use (set by the drift controller) and the last step's GPRL result."""

    def __init__(self, normalization: str = "per_dimension") -> None:
        self.weights: torch.Tensor | None = None  # [K]; None = all ones (controller not started)
        self.normalization = normalization
        self.last: GPRLAdvantages | None = None
        self.last_eigenvalues: torch.Tensor | None = None  # [N, K]
        self.last_lengths: torch.Tensor | None = None  # [N, G] completion token counts, if given
        self.unscored_samples = 0  # samples the experience maker could not score, whole run


def length_spread(lengths: torch.Tensor) -> dict[str, float]:
    """Completion token counts `[N, G]` → the mean over groups of their within-group std (ddof
    0) of n and of log(1 + n). A length exploit shows in these before any verifier axis does;
    the pair tells a spread that shrinks in tokens from one that only shrinks in ratio (what a
    log-scale length feature reads)."""
    n = lengths.double()
    return {
        "gprl/length_group_std": float(n.std(dim=1, correction=0).mean()),
        "gprl/log_length_group_std": float(torch.log1p(n).std(dim=1, correction=0).mean()),
    }


class DriftLoop:
    """Monitor + controller over the last GPRL result; the history and the drift report."""

    def __init__(
        self,
        state: GPRLState,
        config: DriftConfig,
        enabled: bool = True,
        clip_high_ratio: float = 1.0,
        controller_factory: ControllerFactory | None = None,
    ) -> None:
        self.state = state
        self.config = config
        self.enabled = enabled
        self.clip_high_ratio = clip_high_ratio  # ε_high / ε_low at baseline
        self.monitor: DriftMonitor | None = None
        self.controller: DriftController | NoOpDriftController | None = None
        # Builds the controller once K is known (None: DriftController, or the no-op one when
        # disabled); a hook for ablations that act on their own schedule.
        self.controller_factory = controller_factory
        self.history: list[dict[str, Any]] = []
        self.prior = None if config.axis_prior is None else torch.tensor(config.axis_prior)
        if self.prior is not None and state.weights is None:
            state.weights = self.prior.clone()  # the first step already trains with the prior

    def _weights(self) -> torch.Tensor:
        """The m for the next step: the controller's, times the fixed prior if there is one."""
        assert self.controller is not None
        m = self.controller.weights
        return m if self.prior is None else m * self.prior

    def _ensure(self, k: int) -> None:
        if self.monitor is None:
            self.config.prior_for(k)  # refuses a prior whose length is not K
            self.monitor = DriftMonitor(k, self.config)
            if self.controller_factory is not None:
                self.controller = self.controller_factory(k, self.config)
            else:
                cls = DriftController if self.enabled else NoOpDriftController
                self.controller = cls(k, self.config)

    def update(self, global_step: int) -> tuple[ControlState | None, dict[str, float]]:
        """Monitor + controller on the last result; sets the next weights m; returns the new
        control state and the `gprl/` status (None, {} before any result)."""
        result = self.state.last
        if result is None:
            return None, {}
        self._ensure(result.group_scores.shape[-1])
        assert self.monitor is not None and self.controller is not None
        mstate = self.monitor.update(result.mean_axis_variance)
        cstate = self.controller.update(mstate)
        self.state.weights = self._weights()
        status = {**mstate.log_dict("gprl/"), **cstate.log_dict("gprl/")}
        if self.prior is not None:  # log the m in force, not the controller's factor alone
            status.update({f"gprl/m_{i}": float(w) for i, w in enumerate(self.state.weights)})
        status["gprl/clip_eps_high"] = cstate.clip_eps * self.clip_high_ratio
        status.update(result.log_dict("gprl/adv/"))
        if self.state.last_lengths is not None:
            status.update(length_spread(self.state.last_lengths))
        self.history.append({"step": global_step, **status})
        return cstate, status

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "enabled": self.enabled,
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` (the config in force stays this loop's own)."""
        if state.get("monitor") is None or state.get("controller") is None:
            return
        self._ensure(int(state["monitor"]["k"]))
        assert self.monitor is not None and self.controller is not None
        self.monitor.load_state_dict(state["monitor"])
        self.controller.load_state_dict(state["controller"])
        self.state.weights = self._weights()

    def write_report(self, directory: str | Path, plot: bool = True) -> Path:
        """`drift_report.json` (config, final state, per-step history) and `drift_report.png`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "drift_report.json"
        clean = [{k: (None if _isnan(v) else v) for k, v in h.items()} for h in self.history]
        path.write_text(json.dumps({**self.state_dict(), "history": clean}, indent=1))
        if not plot or not self.history:
            return path
        try:
            plot_history(self.history, out / "drift_report.png", self.config.threshold)
        except ImportError:
            log.info("matplotlib not installed: drift report without plot")
        return path


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def plot_history(history: list[dict[str, Any]], path: Path, threshold: float) -> None:
    """Four panels over steps: D(t) with τ_D, α_l(t), m_l, and β / ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]

    def series(prefix: str) -> dict[str, list[float]]:
        keys = sorted({k for h in history for k in h if k.startswith(prefix)})
        return {k: [h.get(k, math.nan) for h in history] for k in keys}

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    panels = [
        (axes[0, 0], {"D(t)": [h.get("gprl/D", math.nan) for h in history]}, "drift D(t)"),
        (axes[0, 1], series("gprl/alpha_"), "variance shares α_l(t)"),
        (axes[1, 0], series("gprl/m_"), "weights m_l"),
        (
            axes[1, 1],
            {
                "β": [h.get("gprl/beta") for h in history],
                "ε": [h.get("gprl/clip_eps") for h in history],
            },
            "β (KL) and ε (clip)",
        ),
    ]
    for ax, lines, title in panels:
        for name, ys in lines.items():
            ax.plot(steps, ys, label=name.replace("gprl/", ""))
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0, 0].axhline(threshold, color="grey", linestyle="--", linewidth=1)
    axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
