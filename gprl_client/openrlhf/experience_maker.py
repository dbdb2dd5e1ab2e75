"""GPRL advantages inside OpenRLHF 0.11.2: a `RemoteExperienceMaker` subclass.

The verifier's OpenRLHF route (`gpm_server/routes_openrlhf.py`) returns, per response, the GPM
embedding and eigenvalues as scalar `extra_logs` keys `gpm_emb_d` / `gpm_eig_l`; OpenRLHF puts
them in `Experience.info` (one value per sample). Here they are put back in prompt order with
`experience.index` (OpenRLHF numbers rollout samples so that sample i belongs to prompt
i // n_samples_per_prompt), reshaped to `[N, G, 2K]` and `[N, K]`, and turned into GPRL
advantages with the drift controller's current weights m. The scalar Â(i) then goes down
OpenRLHF's critic-free path exactly like a `group_norm` reward: terminal reward Â(i) (plus the
per-token −β·KL when the KL is a reward penalty), reward-to-go with γ = 1, advantages = returns.
With `--algo.kl.use_loss` every action token of response i gets exactly Â(i).

The service's `rewards` are ignored (without a reference answer they are 0.0 placeholders).
Per-dimension keys are removed from `info` before experiences travel to the actors (K·3 columns
of logging noise otherwise); summary statistics per axis are kept for the trainer's log, and
the groups' completion lengths go to the drift loop (`gprl/length_group_std`).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from openrlhf.models.utils import compute_reward
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from gprl_core.advantages import gprl_advantages
from gprl_core.drift_loop import GPRLState

log = logging.getLogger(__name__)

_EMB = re.compile(r"^gpm_emb_(\d+)$")
_EIG = re.compile(r"^gpm_eig_(\d+)$")


def gpm_keys(info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The embedding and eigenvalue keys present in `info`, in coordinate order."""
    emb = sorted((k for k in info if _EMB.match(k)), key=lambda k: int(k.rsplit("_", 1)[1]))
    eig = sorted((k for k in info if _EIG.match(k)), key=lambda k: int(k.rsplit("_", 1)[1]))
    return emb, eig


def _columns(info: dict[str, Any], keys: list[str]) -> torch.Tensor:
    """`info[key]` per key as a `[B, len(keys)]` float64 tensor (KeyError if one is missing)."""
    return torch.stack([info[key].double().reshape(-1) for key in keys], -1)


def rebuild_groups(
    experiences: list[Any], n_samples: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`Experience.info` columns → embeddings `[N, G, 2K]`, eigenvalues `[N, K]` (float64) and
    the number of samples left unscored.

    Rows are placed by `experience.index` (original rollout order), so any micro-batch order
    gives the same tensors. A sample is scored only if its micro-batch carries *both* its
    embedding and its eigenvalue columns: a sample whose verifier call failed (any key missing
    or misaligned) gets NaN in both, so it is unscored (advantage 0, left out of its group's
    statistics). λ(x) of a group is the mean over its scored samples; a group with none keeps NaN
    eigenvalues, which `gprl_advantages` treats as unscored as a whole: a group is never scored
    with eigenvalues it did not get.
    """
    emb_keys, eig_keys = [], []
    for exp in experiences:  # the columns of the first micro-batch that has both kinds
        emb_keys, eig_keys = gpm_keys(exp.info)
        if emb_keys and eig_keys:
            break
    d, k = len(emb_keys), len(eig_keys)
    if d == 0 or d != 2 * k:
        raise ValueError(
            f"Experience.info has {d} gpm_emb_* and {k} gpm_eig_* keys (need 2K and K, K >= 1): "
            "is --reward.remote_url the GPM service's /openrlhf/reward route?"
        )
    total = sum(len(exp.index) for exp in experiences)
    if total % n_samples:
        raise ValueError(f"{total} samples do not form groups of {n_samples}")
    emb = torch.full((total, d), math.nan, dtype=torch.float64)
    eig = torch.full((total, k), math.nan, dtype=torch.float64)
    unscored = 0
    for exp in experiences:
        rows = torch.tensor(exp.index)
        try:  # both or neither: nothing is written before every column has been read
            e, lam = _columns(exp.info, emb_keys), _columns(exp.info, eig_keys)
            if e.shape[0] != len(rows) or lam.shape[0] != len(rows):
                raise RuntimeError(f"{e.shape[0]}/{lam.shape[0]} values for {len(rows)} samples")
        except (KeyError, RuntimeError) as err:
            unscored += len(rows)
            log.warning("GPM keys missing or misaligned for samples %s (%s): unscored", rows, err)
            continue
        emb[rows], eig[rows] = e, lam
    emb = emb.reshape(-1, n_samples, d)
    eig = torch.nanmean(eig.reshape(-1, n_samples, k), dim=1)  # λ(x); NaN for a dead group
    return emb, eig, unscored


def group_lengths(experiences: list[Any], n_samples: int) -> torch.Tensor:
    """Generated token counts `[N, G]` in rollout order: `Experience.response_length`, or the
    action mask's count where OpenRLHF did not fill it."""
    total = sum(len(exp.index) for exp in experiences)
    out = torch.zeros(total, dtype=torch.float64)
    for exp in experiences:
        n = getattr(exp, "response_length", None)
        if n is None:
            n = exp.action_mask.sum(dim=-1)
        out[torch.tensor(exp.index)] = torch.as_tensor(n).double().reshape(-1).cpu()
    return out.reshape(-1, n_samples)


def drop_gpm_keys(info: dict[str, Any]) -> None:
    """Remove the per-dimension columns (embedding, eigenvalues) from an info dict in place."""
    emb_keys, eig_keys = gpm_keys(info)
    for key in emb_keys + eig_keys:
        del info[key]


class GPRLExperienceMaker(RemoteExperienceMaker):
    """OpenRLHF's experience maker with GPRL advantages (see the module docstring)."""

    def __init__(self, *args: Any, gprl_state: GPRLState | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gprl = gprl_state or GPRLState()

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: list[Any]) -> list[Any]:
        """Per experience: `advantages`/`returns` `[B, A]`, `info["return"]`, kl cleared."""
        args = self.strategy.args
        n = args.rollout.n_samples_per_prompt
        emb, eig, unscored = rebuild_groups(experiences, n)
        self.gprl.unscored_samples += unscored
        weights = self.gprl.weights
        if weights is not None and weights.shape[0] != eig.shape[1]:
            raise ValueError(f"controller has K={weights.shape[0]}, the verifier K={eig.shape[1]}")
        result = gprl_advantages(emb, eig, weights, normalization=self.gprl.normalization)
        self.gprl.last, self.gprl.last_eigenvalues = result, eig
        self.gprl.last_lengths = group_lengths(experiences, n)
        flat_adv = result.advantages.reshape(-1).float()  # (N·G,), original order
        group_std = result.advantages.std(dim=1, keepdim=True).expand(-1, n).reshape(-1)
        for exp in experiences:
            rows = torch.tensor(exp.index)
            adv = flat_adv[rows]  # (B,)
            exp.info["gprl_advantage"] = adv.clone()
            exp.info["gprl_scored"] = result.valid.reshape(-1)[rows].float()
            exp.info["group_reward_std"] = group_std[rows].float()
            token_reward = compute_reward(
                adv,
                self.kl_ctl.value,
                exp.kl,
                action_mask=exp.action_mask,
                reward_clip_range=args.reward.clip_range,
            )
            exp.returns = self.get_cumulative_returns(token_reward, exp.action_mask, 1.0)
            exp.advantages = exp.returns.clone()
            exp.info["return"] = token_reward.sum(dim=-1)
            exp.kl = None
            drop_gpm_keys(exp.info)
        return experiences
