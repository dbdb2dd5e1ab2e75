"""Glue between features, trainers and our checkpoint format (used by the CLI and the tests)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from gpm_server.checkpoint import GPMConfig, save_gprl_checkpoint
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


def train_finetune(args: argparse.Namespace) -> int:
    """`gpm-server train --mode lora|full`: end-to-end training on the raw pairs."""
    from gpm_server.training.commands import load_backbone, parse_data_arg
    from gpm_server.training.features import read_pairs
    from gpm_server.training.finetune import FinetuneConfig, finetune, save_finetuned

    torch.manual_seed(args.seed)
    pairs = []
    for arg in args.data:
        path, limit = parse_data_arg(arg)
        pairs += read_pairs(path, limit=limit, seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_backbone(args.backbone, args.dtype)
    gated = not args.no_gate
    gpm = fresh_gpm(
        model,
        tok,
        args.k,
        gated,
        length=bool(getattr(args, "length_feature", False)),
        tau=args.tau,
        l2_normalize=not args.no_l2_normalize,
        max_length=args.max_length,
        device=device,
        dtype=args.dtype,
    )
    cfg = FinetuneConfig(
        mode=args.mode,
        lr=args.lr or 1e-5,
        epochs=max(1, min(args.epochs, 3)),
        batch_size=args.batch_size or 8,
        max_steps=args.max_steps,
        seed=args.seed,
        progress=not args.quiet,
    )
    losses = finetune(gpm, pairs, cfg)
    gcfg = GPMConfig(
        k=args.k,
        gated=gated,
        tau=args.tau,
        l2_normalize=not args.no_l2_normalize,
        backbone=args.backbone,
        max_length=args.max_length,
    )
    out = save_finetuned(gpm, args.out, gcfg)
    (out / TRAIN_LOG_FILE).write_text(json.dumps({"mode": args.mode, "losses": losses}) + "\n")
    print(json.dumps({"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}))
    return 0
