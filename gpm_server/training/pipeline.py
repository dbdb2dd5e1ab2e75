"""Glue between features, trainers and our checkpoint format, on plain arguments.

The CLI (`training/commands.py`) parses flags and calls these; nothing here reads `argparse`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from gpm_server.checkpoint import GPMConfig, save_gprl_checkpoint
from gpm_server.training.features import PairRecord
from gpm_server.training.finetune import FinetuneConfig
from gpm_server.training.heads import HeadConfig, TrainResult, train_heads

BT_HEAD_FILE = "bt_head.safetensors"
TRAIN_LOG_FILE = "training_log.json"


def _summary(res: TrainResult) -> dict[str, Any]:
    best = res.history[res.best_epoch] if res.history else {}
    return {
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "best_val_loss": best.get("val_loss"),
        "best_val_acc": best.get("val_acc"),
        "train_pairs": len(res.train_idx),
        "val_pairs": len(res.val_idx),
    }


def train_from_features(
    feats: dict[str, Any],
    cfg: HeadConfig,
    out_dir: str | Path,
    backbone: str,
    max_length: int,
    also_bt: bool = False,
) -> dict[str, Any]:
    """Train GPM heads (and optionally a BT head with the same budget) and write a checkpoint.

    A `kind="bt"` config writes only `bt_head.safetensors` (a scalar head is not a GPM).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {
        "pairs": len(feats["p_chosen"]),
        "datasets": sorted(set(feats["dataset"])),
    }
    if cfg.kind == "gpm":
        res = train_heads(feats, cfg)
        gcfg = GPMConfig(
            k=cfg.k,
            gated=cfg.gated,
            tau=cfg.tau,
            l2_normalize=cfg.l2_normalize,
            backbone=backbone,
            max_length=max_length,
        )
        save_gprl_checkpoint(out, res.heads, gcfg)
        log["gpm"] = {"config": asdict(cfg), **_summary(res), "history": res.history}
    if cfg.kind == "bt" or also_bt:
        bt = train_heads(feats, replace(cfg, kind="bt", tau=1.0))
        save_file({k: v.contiguous() for k, v in bt.heads.items()}, str(out / BT_HEAD_FILE))
        log["bt"] = {"config": asdict(bt.config), **_summary(bt), "history": bt.history}
    (out / TRAIN_LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
    return {
        k: {kk: vv for kk, vv in v.items() if kk != "history"} if isinstance(v, dict) else v
        for k, v in log.items()
    }


def fresh_gpm(
    backbone: Any, tokenizer: Any, k: int, gated: bool, length: bool = False, **kwargs: Any
) -> Any:
    """A `GPM` with small random heads (seeded by the caller) for end-to-end fine-tuning; with
    `length`, a zero-initialised length head."""
    from gpm_server.checkpoint import LENGTH_FEATURES, LENGTH_HEAD, PROMPT_HEAD, VALUE_HEAD
    from gpm_server.model import GPM

    h = int(backbone.config.hidden_size)
    heads = {VALUE_HEAD: torch.randn(2 * k, h) * h**-0.5}
    if gated:
        heads[PROMPT_HEAD] = torch.randn(k, h) * h**-0.5
    if length:
        heads[LENGTH_HEAD] = torch.zeros(2 * k, LENGTH_FEATURES)
    return GPM(backbone, tokenizer, heads, **kwargs)


def finetune_to_checkpoint(
    pairs: Sequence[PairRecord],
    backbone: Any,
    tokenizer: Any,
    config: GPMConfig,
    finetune_config: FinetuneConfig,
    out_dir: str | Path,
    *,
    length: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Fresh heads on `backbone`, fine-tuned end to end on `pairs` (LoRA or full, as
    `finetune_config.mode` says, for exactly `finetune_config.epochs` epochs unless `max_steps`
    stops it first), written as a checkpoint with the backbone inside.

    `config` gives K, the gate, τ, L2 normalisation, the backbone's name and max length. Returns
    `{"steps", "first_loss", "last_loss"}`; the losses go to `training_log.json`.
    """
    from gpm_server.training.finetune import finetune, save_finetuned

    torch.manual_seed(finetune_config.seed)
    gpm = fresh_gpm(
        backbone,
        tokenizer,
        config.k,
        config.gated,
        length=length,
        tau=config.tau,
        l2_normalize=config.l2_normalize,
        max_length=config.max_length,
        device=device,
        dtype=dtype,
    )
    losses = finetune(gpm, pairs, finetune_config)
    out = save_finetuned(gpm, out_dir, config)
    log = {"mode": finetune_config.mode, "losses": losses}
    (out / TRAIN_LOG_FILE).write_text(json.dumps(log) + "\n")
    return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
