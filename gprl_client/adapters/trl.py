"""GPRL for TRL 1.16: `GPRLGRPOTrainer`, a `GRPOTrainer` whose advantages are GPRL's.

TRL's GRPO has no advantage hook, so two methods are overridden (read from TRL 1.16's source):

- `_calculate_rewards(inputs, prompts, completions, completion_ids)`: called once per
  generation batch with this process's (prompt, completion) pairs. We score them with the GPM
  service in **one** `/score` call (consecutive completions of the same prompt form a group),
  gather the embeddings `[B, 2K]` and eigenvalues `[B, K]` of all processes (as TRL gathers its
  rewards, since a group may straddle processes), keep them, and return the GPM scalar
  `Σ_l λ_l ŝ_l / τ` (the mean win logit within the group) as the single reward column: TRL
  logs it as `rewards/gpm/mean`; NaN marks an unscored completion.
- `_generate_and_score_completions(inputs)`: runs TRL's own, then replaces `out["advantages"]`
  (this process's slice) by `gprl_advantages` of the gathered `[N, G, 2K]`, `[N, K]` with the
  drift controller's current weights m. This happens before `_prepare_inputs` shuffles and
  splits the generation batch, so every micro-batch carries the GPRL advantage of its rows.

Drift control (training mode only): after each generation batch the monitor and controller run
(`gprl_core.drift_loop.DriftLoop.update`, shared with the OpenRLHF trainer) and the new
β and ε are written to `self.beta` and `self.epsilon_low/high`, which TRL's `_compute_loss` reads
at every optimisation step. `beta` must be > 0 at construction: TRL builds the reference model
only then (`args.beta == 0` → no `ref_model`, and a later β > 0 would have nothing to compare to).
`gprl/...` metrics (D, α, m, β, ε, per-axis statistics, the within-group spread of completion
lengths) go through TRL's logger; `train()` ends by
writing the drift report (`<output_dir>/gprl_drift/drift_report.json` + `.png`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather
from trl import GRPOTrainer

from gprl_core.advantages import gpm_scalar_reward, gprl_advantages
from gprl_core.drift import DriftConfig, drift_config
from gprl_core.drift_loop import DriftLoop, GPRLState

log = logging.getLogger(__name__)


def gpm_preference(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Placeholder reward function (names TRL's reward column `gpm`); GPRLGRPOTrainer computes
    the rewards itself in `_calculate_rewards`, so this is never called."""
    raise RuntimeError("gpm_preference is only a name: use it with GPRLGRPOTrainer")


def completion_text(completion: Any) -> str:
    """A TRL completion (plain text or a list of assistant messages) → its text."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if m.get("role") == "assistant")


def consecutive_groups(prompts: list[Any]) -> list[tuple[Any, range]]:
    """Runs of equal consecutive prompts → `[(prompt, rows)]` (TRL repeats each prompt G times)."""
    groups: list[tuple[Any, range]] = []
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            groups.append((prompts[start], range(start, i)))
            start = i
    return groups


def _drift_base(config: DriftConfig | str | None) -> DriftConfig:
    """A DriftConfig as given, or a preset by name (None: the default preset)."""
    if config is None or isinstance(config, str):
        return drift_config(config or "project")
    return config


class GPRLGRPOTrainer(GRPOTrainer):
    """TRL GRPO with GPRL advantages from a GPM service (see the module docstring).

    Extra arguments: `gpm_client` (a `gprl_client.GPMClient`), `drift_config` (a `DriftConfig`,
    or a preset name, "paper" or "project"; β₀ and ε₀ are taken from `args.beta` and
    `args.epsilon`), `drift_control` (False: monitor only), `normalization` ("per_dimension",
    GPRL; "global": Σ_l m_l λ_l ŝ_l normalised as one number, which with the controller off is
    scalar GRPO on the GPM's `rewards` field, up to the common factor τ), `run_id`
    (tags the `/score` calls for the service's drift telemetry), `report_dir`.
    """

    def __init__(
        self,
        *args: Any,
        gpm_client: Any,
        drift_config: DriftConfig | str | None = None,
        drift_control: bool = True,
        normalization: str = "per_dimension",
        run_id: str | None = None,
        report_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if config is None or config.beta <= 0:
            raise ValueError(
                "GPRLGRPOTrainer needs GRPOConfig(beta > 0): TRL builds the reference model only "
                "when beta > 0, and the drift controller raises beta from there"
            )
        kwargs.setdefault("reward_funcs", [gpm_preference])
        super().__init__(*args, **kwargs)
        eps_low, eps_high = float(self.epsilon_low), float(self.epsilon_high)
        base = _drift_base(drift_config)
        fields = {**base.__dict__, "beta": float(self.beta), "clip_eps": eps_low}
        fields["beta_max"] = max(fields["beta_max"], fields["beta"])
        fields["clip_eps_min"] = min(fields["clip_eps_min"], eps_low)
        self.drift_loop = DriftLoop(
            GPRLState(normalization=normalization),
            DriftConfig(**fields),
            drift_control,
            eps_high / eps_low if eps_low else 1.0,
        )
        self.gpm_client = gpm_client
        self.gprl_run_id = run_id
        self.gprl_report_dir = Path(report_dir or Path(self.args.output_dir) / "gprl_drift")
        self._gprl_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gprl_lengths: torch.Tensor | None = None
        self._gprl_calls = 0

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[override]
        device = self.accelerator.device
        groups = consecutive_groups(prompts)
        payload = [(p, [completion_text(completions[i]) for i in rows]) for p, rows in groups]
        step = self._gprl_calls if self.gprl_run_id is not None else None
        res = self.gpm_client.score(payload, run_id=self.gprl_run_id, step=step)
        self._gprl_calls += 1
        emb = torch.cat([res.embeddings[n, : len(rows)] for n, (_, rows) in enumerate(groups)])
        eig = torch.cat(
            [res.eigenvalues[n].expand(len(rows), -1) for n, (_, rows) in enumerate(groups)]
        )
        emb, eig = gather(emb.float().to(device)), gather(eig.float().to(device))  # (B_all, ·)
        self._gprl_batch = (emb, eig)
        lengths = torch.tensor([len(ids) for ids in completion_ids_list], device=device)
        self._gprl_lengths = gather(lengths)
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval
        scalar = gpm_scalar_reward(
            emb.view(-1, g, emb.shape[-1]), eig.view(-1, g, eig.shape[-1])[:, 0], res.tau
        )
        return scalar.reshape(-1, 1).float()  # (B_all, 1): the `gpm` reward column

    def _generate_and_score_completions(self, inputs):  # type: ignore[override]
        out = super()._generate_and_score_completions(inputs)
        assert self._gprl_batch is not None
        emb, eig = self._gprl_batch
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval
        d, k = emb.shape[-1], eig.shape[-1]
        state = self.drift_loop.state
        result = gprl_advantages(
            emb.view(-1, g, d),
            eig.view(-1, g, k)[:, 0],
            state.weights,
            normalization=state.normalization,
        )
        local = out["advantages"].shape[0]
        rank = self.accelerator.process_index
        advantages = result.advantages.reshape(-1)[rank * local : (rank + 1) * local]
        out["advantages"] = advantages.to(out["advantages"].dtype).to(out["advantages"].device)
        if mode == "train":
            state.last = result
            lengths = self._gprl_lengths
            state.last_lengths = None if lengths is None else lengths.view(-1, g).cpu()
            cstate, status = self.drift_loop.update(int(self.state.global_step))
            if cstate is not None:
                self.beta = cstate.beta
                self.epsilon_low = cstate.clip_eps
                self.epsilon_high = cstate.clip_eps * self.drift_loop.clip_high_ratio
            for key, value in status.items():
                self._metrics[mode][key].append(float(value))
        return out

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.accelerator.is_main_process and self.drift_loop.history:
                path = self.drift_loop.write_report(self.gprl_report_dir)
                log.info("GPRL drift report: %s", path)
