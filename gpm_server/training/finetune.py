"""End-to-end GPM fine-tuning (full or LoRA) for GPU users; heads-only training is `heads.py`.

Letters: B pairs per step, K subspaces, D = 2K. The forward pass is `GPM.embed_tensors`, the very
code that serves, so a fine-tuned model scores exactly as it trained. The loss is the soft-label
GPM loss of gprl-math.md §1 (`heads.pair_loss`). LoRA uses peft; the adapters are merged into
the backbone before saving, so the checkpoint is a plain `gprl` directory with `backbone: "."`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gpm_server.training.features import PairRecord
from gpm_server.training.heads import pair_loss
from gprl_core.gpm_math import preference_score


@dataclass
class FinetuneConfig:
    """How to fine-tune: `epochs` passes over the pairs (fewer when `max_steps` stops first)."""

    mode: Literal["full", "lora"] = "lora"
    lr: float = 1e-5
    head_lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 8
    max_steps: int | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        # Refuse, never clamp: a silently changed budget is a different experiment.
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None), got {self.max_steps}")


def _trainable_heads(gpm: Any) -> list[torch.nn.Parameter]:
    heads = [h for h in (gpm.value_head, gpm.prompt_head, gpm.length_head) if h is not None]
    params = []
    for h in heads:
        h.train().requires_grad_(True)
        params += list(h.parameters())
    return params


def _wrap_backbone(gpm: Any, cfg: FinetuneConfig) -> None:
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_targets,
        )
        gpm.backbone = get_peft_model(gpm.backbone, lora)
    else:
        gpm.backbone.requires_grad_(True)
    gpm.backbone.train()


def step_loss(gpm: Any, batch: Sequence[PairRecord]) -> torch.Tensor:
    """GPM loss of one batch of pairs through the serving forward pass (differentiable)."""
    seqs = gpm.encode([(p.prompt, r) for p in batch for r in (p.chosen, p.rejected)])
    ids, last_pos, gate_pos = gpm.collate(seqs)
    lengths = torch.tensor([x.full_response_tokens for x in seqs], device=ids.device)
    emb, eig = gpm.embed_tensors(ids, last_pos, gate_pos, response_tokens=lengths)  # (2B, 2K/K)
    s = preference_score(emb[0::2], emb[1::2], eig[0::2] if gpm.prompt_head is not None else None)
    p = torch.tensor([x.p_chosen for x in batch], device=s.device)
    return pair_loss(s / gpm.tau, p)


def finetune(gpm: Any, pairs: Sequence[PairRecord], cfg: FinetuneConfig) -> list[float]:
    """Train `gpm` (a `gpm_server.model.GPM`) in place; returns the per-step losses."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    _wrap_backbone(gpm, cfg)
    head_params = _trainable_heads(gpm)
    body = [p for p in gpm.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}]
    )
    steps_per_epoch = max(1, (len(pairs) + cfg.batch_size - 1) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    losses: list[float] = []
    order: list[int] = []
    for _step in tqdm(range(total), desc=f"finetune {cfg.mode}", disable=not cfg.progress):
        if not order:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        batch = [pairs[order.pop()] for _ in range(min(cfg.batch_size, len(order)))]
        loss = step_loss(gpm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save_finetuned(gpm: Any, out_dir: str | Path, base_config: Any) -> Path:
    """Merge LoRA adapters (if any) and write a gprl checkpoint with the backbone inside."""
    from dataclasses import replace

    from gpm_server.checkpoint import save_gprl_checkpoint

    backbone = gpm.backbone
    if hasattr(backbone, "merge_and_unload"):
        backbone = backbone.merge_and_unload()
    backbone.eval().requires_grad_(False)
    heads = gpm.heads()
    config = replace(base_config, backbone=".")
    return save_gprl_checkpoint(out_dir, heads, config, backbone=backbone, tokenizer=gpm.tokenizer)
