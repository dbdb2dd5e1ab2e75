"""Train GPM heads (or a Bradley-Terry head, for comparison) on cached backbone features.

Letters: N pairs, H hidden size, K subspaces, D = 2K.

GPM (gprl-math.md §1): `value_head` [2K, H] and optional `prompt_head` [K, H], bias-free, read at
the features of `features.py`; the loss for a pair (chosen w, rejected l) with soft label p is
`−[p log σ(s/τ) + (1 − p) log σ(−s/τ)]`, s = s(w ≻ l | x) from `gprl_core.gpm_math`.
Bradley-Terry: `reward_head` [1, H], the same loss with s = r_w − r_l and τ = 1 (the head's scale
is free, so τ would only rescale the learning rate).

Length feature (optional, `HeadConfig.length_feature`): both kinds also read
`checkpoint.length_feature(n)` = (log(1 + n), 1) of each response's untruncated token count n
through a `length_head` ([2K, 2] for GPM, added before L2 normalisation; [1, 2] for BT), so the
two are still trained on identical inputs.

Optimisation **[project choice]**: features are divided by their per-dimension RMS during
training (well-conditioned Adam steps) and the scale is folded back into the weights at the end,
so the saved heads read the raw hidden states exactly as the serving model does. No centring:
the heads have no bias, as in the reference.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gpm_server.checkpoint import LENGTH_FEATURES, LENGTH_HEAD, length_feature
from gprl_core.gpm_math import l2_normalize as _l2_normalize
from gprl_core.gpm_math import preference_score

HeadKind = Literal["gpm", "bt"]


@dataclass
class HeadConfig:
    kind: HeadKind = "gpm"
    k: int = 3
    gated: bool = True
    l2_normalize: bool = True
    tau: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-4
    epochs: int = 200
    batch_size: int = 256
    patience: int = 15
    val_frac: float = 0.15
    seed: int = 0
    progress: bool = True
    length_feature: bool = False
    # Per-data-set loss weights (e.g. to restore the full splits' mix after subsampling).
    dataset_weights: dict[str, float] | None = None


@dataclass
class TrainResult:
    heads: dict[str, torch.Tensor]
    config: HeadConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    train_idx: list[int] = field(default_factory=list)
    val_idx: list[int] = field(default_factory=list)


class PreferenceHeads(nn.Module):
    """GPM heads or a BT reward head on features `[N, H]`; `scale` `[H]` divides the inputs
    (`length_input_scale` the length feature's, when `cfg.length_feature`: a training-time
    normaliser folded into the exported weights, not a checkpoint's `length_scale`)."""

    def __init__(
        self,
        hidden: int,
        cfg: HeadConfig,
        scale: torch.Tensor | None = None,
        length_input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("scale", torch.ones(hidden) if scale is None else scale.clone())
        self.length_input_scale = float(length_input_scale)
        out = 1 if cfg.kind == "bt" else 2 * cfg.k
        self.length_head = (
            nn.Linear(LENGTH_FEATURES, out, bias=False) if cfg.length_feature else None
        )
        if self.length_head is not None:
            nn.init.zeros_(self.length_head.weight)  # start from the content-only model
        if cfg.kind == "bt":
            self.reward_head = nn.Linear(hidden, 1, bias=False)
        else:
            self.value_head = nn.Linear(hidden, 2 * cfg.k, bias=False)
            self.prompt_head = nn.Linear(hidden, cfg.k, bias=False) if cfg.gated else None

    def _plus_length(self, v: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        if self.length_head is None:
            return v
        if tokens is None:
            raise ValueError("length_feature is on: pass the responses' token counts")
        return v + self.length_head(length_feature(tokens) / self.length_input_scale)

    def embed(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Response embeddings `[N, 2K]` (L2-normalised when configured)."""
        v = self._plus_length(self.value_head(h / self.scale), tokens)
        return _l2_normalize(v) if self.cfg.l2_normalize else v

    def reward(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """BT rewards `[N]`."""
        return self._plus_length(self.reward_head(h / self.scale), tokens)[:, 0]

    def eigenvalues(self, h_prompt: torch.Tensor) -> torch.Tensor | None:
        """λ(x) `[N, K]` (softmax of the prompt head) or None when ungated."""
        if self.cfg.kind == "bt" or self.prompt_head is None:
            return None
        return torch.softmax(self.prompt_head(h_prompt / self.scale), dim=-1)

    def logits(
        self,
        h_w: torch.Tensor,
        h_l: torch.Tensor,
        h_prompt: torch.Tensor,
        n_w: torch.Tensor | None = None,
        n_l: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`s(w ≻ l)/τ` for GPM, `r_w − r_l` for BT: `[N]` (`n_*`: untruncated token counts)."""
        if self.cfg.kind == "bt":
            return self.reward(h_w, n_w) - self.reward(h_l, n_l)
        s = preference_score(self.embed(h_w, n_w), self.embed(h_l, n_l), self.eigenvalues(h_prompt))
        return s / self.cfg.tau

    def export(self) -> dict[str, torch.Tensor]:
        """Weights that read raw features (scale folded in), named as in our checkpoints."""
        fold = (1.0 / self.scale)[None, :]
        if self.cfg.kind == "bt":
            out = {"reward_head.weight": (self.reward_head.weight * fold).detach().clone()}
        else:
            out = {"value_head.weight": (self.value_head.weight * fold).detach().clone()}
            if self.prompt_head is not None:
                out["prompt_head.weight"] = (self.prompt_head.weight * fold).detach().clone()
        if self.length_head is not None:
            w = self.length_head.weight / self.length_input_scale
            out[LENGTH_HEAD] = w.detach().clone()
        return out


def pair_loss(
    logits: torch.Tensor, p_chosen: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft-label loss `−[p log σ(z) + (1−p) log σ(−z)]` over pairs `[N]`: the mean, or the
    `weight`-weighted mean."""
    per_pair = -(
        p_chosen * nn.functional.logsigmoid(logits)
        + (1 - p_chosen) * nn.functional.logsigmoid(-logits)
    )
    if weight is None:
        return per_pair.mean()
    return (weight * per_pair).sum() / weight.sum()


def pair_weights(datasets: list[str], dataset_weights: dict[str, float] | None) -> torch.Tensor:
    """A weight per pair from its data set's name (1 for data sets not listed)."""
    table = dataset_weights or {}
    unknown = set(table) - set(datasets)
    if unknown:
        raise ValueError(f"dataset weights for data sets not in the features: {sorted(unknown)}")
    return torch.tensor([float(table.get(name, 1.0)) for name in datasets])


def split_by_prompt(
    prompt_ids: list[str], val_frac: float, seed: int
) -> tuple[list[int], list[int]]:
    """Held-out split by prompt (pairs sharing a prompt stay on one side): `(train, val)`.

    The prompts are shuffled in order of first appearance, never sorted by id: the ids are
    hashes of float features (`prompt_ids_of`), which differ in the last bit between CPU kernels
    (AVX2 or not), and sorting them gave every machine a different split of the same data.
    """
    keys = list(dict.fromkeys(prompt_ids))
    random.Random(seed).shuffle(keys)
    n_val = round(val_frac * len(keys))
    if val_frac > 0 and len(keys) > 1:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val_keys = set(keys[:n_val])
    train = [i for i, k in enumerate(prompt_ids) if k not in val_keys]
    val = [i for i, k in enumerate(prompt_ids) if k in val_keys]
    return train, val


def prompt_ids_of(feats: dict[str, Any]) -> list[str]:
    """A prompt id per pair: hash of the gate feature (equal prompts give equal states)."""
    h = feats["h_prompt"]
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=8).hexdigest() for row in h]


def _rms_scale(h: torch.Tensor) -> torch.Tensor:
    return h.pow(2).mean(dim=0).sqrt().clamp_min(1e-6)


def pair_tokens(feats: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Untruncated response token counts `([N], [N])` of chosen and rejected, if cached."""
    return feats.get("full_tokens_chosen"), feats.get("full_tokens_rejected")


def batch_logits(model: PreferenceHeads, feats: dict[str, Any], idx: list[int]) -> torch.Tensor:
    n_w, n_l = pair_tokens(feats)
    return model.logits(
        feats["h_chosen"][idx],
        feats["h_rejected"][idx],
        feats["h_prompt"][idx],
        None if n_w is None else n_w[idx],
        None if n_l is None else n_l[idx],
    )


@torch.no_grad()
def evaluate_logits(model: PreferenceHeads, feats: dict[str, Any], idx: list[int]) -> torch.Tensor:
    return batch_logits(model, feats, idx)


def train_heads(feats: dict[str, Any], cfg: HeadConfig) -> TrainResult:
    """Train on `feats` (from `features.load_features`); early stopping on the held-out loss."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    train_idx, val_idx = split_by_prompt(prompt_ids_of(feats), cfg.val_frac, cfg.seed)
    all_h = torch.cat([feats["h_chosen"][train_idx], feats["h_rejected"][train_idx]])
    length_input_scale = 1.0
    if cfg.length_feature:
        n_w, n_l = pair_tokens(feats)
        if n_w is None or n_l is None:
            raise ValueError("length_feature needs full_tokens_chosen/rejected in the features")
        n = torch.cat([n_w[train_idx], n_l[train_idx]])
        # Under Adam each weight moves ~lr per step, so H content weights can move the logit
        # ~sqrt(H) times faster than one length weight; feeding the length feature at RMS
        # sqrt(H) evens that out (else early stopping ends training before length counts).
        length_input_scale = float(_rms_scale(length_feature(n))[0]) / math.sqrt(all_h.shape[1])
    model = PreferenceHeads(all_h.shape[1], cfg, _rms_scale(all_h), length_input_scale)
    # No decay on the length weights: two per output, nothing to regularise away.
    named = list(model.named_parameters())
    length = [p for n, p in named if n.startswith("length_head.")]
    rest = [p for n, p in named if not n.startswith("length_head.")]
    groups = [{"params": rest}, {"params": length, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    p = feats["p_chosen"].float()
    names = list(feats.get("dataset") or [""] * len(feats["p_chosen"]))
    weight = pair_weights(names, cfg.dataset_weights)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (math.inf, 0, model.export())
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc=f"train {cfg.kind}", disable=not cfg.progress)
    for epoch in bar:
        perm = torch.tensor(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        total = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            b = perm[start : start + cfg.batch_size].tolist()
            loss = pair_loss(batch_logits(model, feats, b), p[b], weight[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        row = {"epoch": epoch, "train_loss": total / max(len(train_idx), 1)}
        monitor = val_idx or train_idx
        z = evaluate_logits(model, feats, monitor)
        w = weight[monitor]
        row["val_loss"] = pair_loss(z, p[monitor], w).item()
        row["val_acc"] = ((w * (z > 0).float()).sum() / w.sum()).item()
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
        if row["val_loss"] < best[0] - 1e-5:
            best = (row["val_loss"], epoch, model.export())
        elif epoch - best[1] >= cfg.patience:
            break
    return TrainResult(best[2], cfg, history, best[1], train_idx, val_idx)
