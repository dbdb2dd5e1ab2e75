"""`gpm-server train` and `gpm-server eval`: argument parsers and runners.

`register(subparsers)` adds both subcommands to the service CLI. Data files are gzip JSONL in
the shared format; each `--data` argument is `PATH` or `PATH:LIMIT` (a seeded subsample).
Features are cached under `--features-dir` (default `$GPM_CACHE_DIR/../features` or
`~/.cache/gprl/features`), keyed by backbone, max length and file, so a second run is cheap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any


def _features_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("GPM_CACHE_DIR")
    return (Path(env).parent if env else Path.home() / ".cache" / "gprl") / "features"


def parse_data_arg(arg: str) -> tuple[Path, int | None]:
    """`PATH` or `PATH:LIMIT` → `(path, limit)`."""
    head, sep, tail = arg.rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(arg), None


def parse_dataset_weights(items: list[str]) -> dict[str, float] | None:
    """`["hh-rlhf-harmless=1", "alpacaeval-prefs=4.1"]` → `{name: weight}` (None if empty)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or not weight > 0:
            raise SystemExit(f"--dataset-weight wants NAME=W with W > 0, got {item!r}")
        out[name] = weight
    return out or None


def feature_dir_for(root: Path, backbone: str, max_length: int, data: Path) -> Path:
    """`root/<backbone-hash>-ml<max_length>/<data set>/<file stem>`."""
    tag = hashlib.blake2b(backbone.encode(), digest_size=4).hexdigest()
    stem = data.name.split(".")[0]
    return root / f"{tag}-ml{max_length}" / data.parent.name / stem


def load_backbone(spec: str, dtype: str = "float32") -> tuple[Any, Any]:
    """`(causal LM, tokenizer)` for a GGUF spec, a local directory or a hub id."""
    from gpm_server.checkpoint import parse_dtype

    torch_dtype = parse_dtype(dtype)
    if spec.startswith("gguf:"):
        from gpm_server.gguf_backbone import load_gguf_backbone

        return load_gguf_backbone(spec, torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(
        spec, dtype=torch_dtype
    ), AutoTokenizer.from_pretrained(spec)


def cached_features(args: argparse.Namespace, backbone: str, max_length: int) -> dict[str, Any]:
    """Extract (only what is missing) and load features for every `--data` argument."""
    from gpm_server.training.features import (
        add_token_counts,
        concat_features,
        extract_features,
        feature_gpm,
        load_features,
        missing_pairs,
        needs_token_counts,
        read_pairs,
    )

    root = _features_root(args.features_dir)
    gpm = None
    parts = []
    for arg in args.data:
        path, limit = parse_data_arg(arg)
        out = feature_dir_for(root, backbone, max_length, path)
        pairs = read_pairs(path, limit=limit, seed=args.seed)
        if missing_pairs(out, pairs):
            if gpm is None:  # the backbone loads only when something is missing
                gpm = feature_gpm(*load_backbone(backbone, args.dtype), max_length, backbone)
            source = f"{path.parent.name}/{path.name.split('.')[0]}"
            extract_features(gpm, pairs, out, source=source, seed=args.seed)
        if needs_token_counts(out):  # a cache made before token counts were stored
            if gpm is None:
                gpm = feature_gpm(*load_backbone(backbone, args.dtype), max_length, backbone)
            add_token_counts(gpm, out, path)
        parts.append(load_features(out, [p.index for p in pairs]))
    return concat_features(*parts)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="PATH or PATH:LIMIT (gzip JSONL)")
    p.add_argument("--features-dir", default=None, help="feature cache root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")


def register(subparsers: Any) -> None:
    """Add `train` and `eval` to the `gpm-server` subcommands."""
    t = subparsers.add_parser("train", help="train a GPM (heads on cached features, or LoRA/full)")
    _add_common(t)
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--backbone", default="gguf:smollm2", help="gguf:smollm2, directory or hub id")
    t.add_argument("--mode", choices=["heads", "lora", "full"], default="heads")
    t.add_argument("--head", choices=["gpm", "bt"], default="gpm")
    t.add_argument(
        "--also-bt", action="store_true", help="also train a BT head (bt_head.safetensors)"
    )
    t.add_argument("--k", type=int, default=3)
    t.add_argument("--no-gate", action="store_true", help="no prompt head (all λ = 1)")
    t.add_argument("--tau", type=float, default=0.1)
    t.add_argument(
        "--length-feature",
        action="store_true",
        help="heads also read log(1 + response tokens before truncation) (GPM and BT alike)",
    )
    t.add_argument("--no-l2-normalize", action="store_true")
    t.add_argument("--max-length", type=int, default=320)
    t.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the data; default 300 (heads, early stopping) or 3 (lora/full)",
    )
    t.add_argument("--lr", type=float, default=None, help="default 3e-3 (heads), 1e-5 (lora/full)")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument(
        "--dataset-weight",
        action="append",
        default=[],
        metavar="NAME=W",
        help="loss weight of one data set's pairs (its folder name); repeatable; default 1",
    )
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--patience", type=int, default=20)
    t.add_argument("--val-frac", type=float, default=0.15)
    t.add_argument("--max-steps", type=int, default=None, help="lora/full: stop after N steps")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run_train)
    e = subparsers.add_parser("eval", help="evaluate a GPM checkpoint on preference pairs")
    _add_common(e)
    e.add_argument("--model", required=True, help="gprl checkpoint directory (heads + config)")
    e.add_argument("--bt-head", default=None, help="a bt_head.safetensors to compare against")
    e.add_argument("--out-json", default="eval.json")
    e.add_argument("--plot", default=None, help="PNG path for the plot")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from gpm_server.training.heads import HeadConfig
    from gpm_server.training.pipeline import train_from_features

    if args.mode != "heads":
        return train_finetune(args)
    cfg = HeadConfig(
        kind=args.head,
        k=args.k,
        gated=not args.no_gate,
        l2_normalize=not args.no_l2_normalize,
        tau=args.tau,
        lr=args.lr or 3e-3,
        weight_decay=args.weight_decay,
        epochs=args.epochs if args.epochs is not None else 300,
        batch_size=args.batch_size or 256,
        patience=args.patience,
        val_frac=args.val_frac,
        seed=args.seed,
        progress=not args.quiet,
        length_feature=args.length_feature,
        dataset_weights=parse_dataset_weights(args.dataset_weight),
    )
    feats = cached_features(args, args.backbone, args.max_length)
    summary = train_from_features(
        feats, cfg, args.out, args.backbone, args.max_length, args.also_bt
    )
    print(json.dumps(summary, indent=2))
    return 0


def train_finetune(args: argparse.Namespace) -> int:
    """`gpm-server train --mode lora|full`: end-to-end training on the raw pairs."""
    import torch

    from gpm_server.checkpoint import GPMConfig
    from gpm_server.training.features import read_pairs
    from gpm_server.training.finetune import FinetuneConfig
    from gpm_server.training.pipeline import finetune_to_checkpoint

    cfg = FinetuneConfig(  # checked before anything loads: a bad flag fails in milliseconds
        mode=args.mode,
        lr=args.lr or 1e-5,
        epochs=args.epochs if args.epochs is not None else 3,
        batch_size=args.batch_size or 8,
        max_steps=args.max_steps,
        seed=args.seed,
        progress=not args.quiet,
    )
    pairs = []
    for arg in args.data:
        path, limit = parse_data_arg(arg)
        pairs += read_pairs(path, limit=limit, seed=args.seed)
    gcfg = GPMConfig(
        k=args.k,
        gated=not args.no_gate,
        tau=args.tau,
        l2_normalize=not args.no_l2_normalize,
        backbone=args.backbone,
        max_length=args.max_length,
    )
    summary = finetune_to_checkpoint(
        pairs,
        *load_backbone(args.backbone, args.dtype),
        gcfg,
        cfg,
        args.out,
        length=args.length_feature,
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype=args.dtype,
    )
    print(json.dumps(summary))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from gpm_server.checkpoint import CONFIG_FILE, HEADS_FILE, GPMConfig
    from gpm_server.evaluate import evaluate, plot_results, write_json

    ckpt = Path(args.model)
    cfg = GPMConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
    backbone = str(ckpt.resolve()) if cfg.backbone == "." else cfg.backbone
    feats = cached_features(args, backbone, cfg.max_length)
    models = {"gpm": ("gpm", load_file(str(ckpt / HEADS_FILE)))}
    bt = args.bt_head or (
        str(ckpt / "bt_head.safetensors") if (ckpt / "bt_head.safetensors").exists() else None
    )
    if bt:
        models["bradley_terry"] = ("bt", load_file(bt))
    result = evaluate(
        feats,
        models,
        tau=cfg.tau,
        l2_normalize=cfg.l2_normalize,
        length_scale=cfg.length_scale,
    )
    result["checkpoint"] = {**cfg.to_dict(), "path": str(ckpt)}
    result["data"] = list(args.data)
    write_json(result, args.out_json)
    if args.plot:
        plot_results(result, args.plot)
    print(json.dumps({n: m["by_dataset"]["all"] for n, m in result["models"].items()}, indent=2))
    return 0
