"""Run every variant × seed of the reward-hacking testbed; write JSON and plots.

    python -m benchmarks.reward_hacking.run            # full: 9 variants × 5 seeds × 300 steps
    python -m benchmarks.reward_hacking.run --quick    # seconds: for tests and smoke checks
    python -m benchmarks.reward_hacking.run --variants gprl_full_paper --update   # add / redo one

Writes benchmarks/results/reward_hacking.json (per-step mean ± std per variant, per-seed
summaries, the targets) and benchmarks/results/reward_hacking_*.png. See docs/reward_hacking.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.reward_hacking.env import EnvConfig, RewardHackingEnv
from benchmarks.reward_hacking.summary import (
    markdown_table,
    per_step,
    seed_summary,
    targets,
    variant_summary,
)
from benchmarks.reward_hacking.train import TrainConfig, Variant, train, variant_drift

log = logging.getLogger("reward_hacking")

RESULTS = Path(__file__).resolve().parents[1] / "results"

VARIANTS = (
    Variant("scalar_grpo", "exploitable", "scalar_grpo", controller=False),
    Variant("gprl_global", "exploitable", "global", controller=True),
    Variant("gprl_no_controller", "exploitable", "per_dimension", controller=False),
    Variant("gprl_full", "exploitable", "per_dimension", controller=True),
    Variant("gprl_full_k1", "scalar", "per_dimension", controller=True),
    Variant("gprl_full_clean", "clean", "per_dimension", controller=True),
    Variant("gprl_no_controller_clean", "clean", "per_dimension", controller=False),
    Variant("gprl_full_paper", "exploitable", "per_dimension", True, drift_preset="paper"),
    Variant("gprl_full_paper_clean", "clean", "per_dimension", True, drift_preset="paper"),
)

NAMES = tuple(v.name for v in VARIANTS)

DESCRIPTIONS = {
    "scalar_grpo": "GRPO on the K=3 GPM's scalar score Σ_l λ_l ŝ_l (gpm_scalar_reward)",
    "gprl_global": "GPRL, global normalisation (sum then normalise), with the drift controller",
    "gprl_no_controller": "GPRL, per-dimension normalisation, NoOpDriftController",
    "gprl_full": "GPRL, per-dimension normalisation, DriftController (m, β, ε)",
    "gprl_full_k1": "full GPRL with a K=1 proxy (one axis mixing everything)",
    "gprl_full_clean": "full GPRL on the clean proxy (no exploitable axis): false-alarm check",
    "gprl_no_controller_clean": "GPRL without controller on the clean proxy (reference for it)",
    "gprl_full_paper": "full GPRL with the paper's controller rule (drift_config('paper'))",
    "gprl_full_paper_clean": "full GPRL, paper's rule, clean proxy: false-alarm check",
}


def quick_config() -> tuple[TrainConfig, int]:
    """The test setting: short runs, two seeds (seconds in total)."""
    return TrainConfig(steps=80, n_prompts=8), 2


def run_all(
    config: TrainConfig,
    seeds: int,
    variants: tuple[Variant, ...] = VARIANTS,
    env_config: EnvConfig | None = None,
) -> dict[str, object]:
    """Train every variant on seeds 0..seeds−1; returns the JSON-ready result."""
    env = RewardHackingEnv(env_config)
    out: dict[str, object] = {
        "config": {
            "env": asdict(env.config),
            "train": asdict(config),
            "seeds": seeds,
            "length_gain": env.length_gain,
        },
        "variants": {},
    }
    summaries = {}
    for variant in variants:
        start = time.perf_counter()
        logs = [train(env, variant, config, seed) for seed in range(seeds)]
        summaries[variant.name] = variant_summary([seed_summary(lg) for lg in logs])
        out["variants"][variant.name] = {
            "description": DESCRIPTIONS.get(variant.name, ""),
            "variant": asdict(variant),
            "drift": asdict(variant_drift(variant, config)),  # the rule and knobs it ran with
            "summary": summaries[variant.name],
            "per_step": per_step(logs),
        }
        s = summaries[variant.name]
        log.info(
            "%-26s peak %.3f final %.3f drop %5.1f%% ± %4.1f  corrections %.0f  (%.0fs)",
            variant.name,
            s["peak"]["mean"],
            s["final"]["mean"],
            100 * s["drop"]["mean"],
            100 * s["drop"]["std"],
            s["mean_corrections"],
            time.perf_counter() - start,
        )
    out["targets"] = targets(summaries)
    return out


def _agrees(old: object, new: object) -> bool:
    """Every setting recorded in `old` has the same value in `new` (`new` may record more: a knob
    added to the code since, whose default keeps the old behaviour)."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _agrees(old[k], new[k]) for k in old)
    return old == new


def merge_results(old: dict, new: dict) -> dict:
    """`old` with the variants of `new` added or replaced, targets re-evaluated on the union.

    Valid because each variant's runs depend only on its own settings and seeds, never on which
    other variants ran; refused unless both were run with the same config (world, training, seeds).
    """
    config = json.loads(json.dumps(new["config"]))
    if not _agrees(old["config"], config):
        raise ValueError("cannot merge results run with different configs")
    names = [*NAMES, *(n for n in old["variants"] if n not in NAMES)]
    runs = {**old["variants"], **new["variants"]}
    variants = {n: runs[n] for n in names if n in runs}
    summaries = {n: v["summary"] for n, v in variants.items()}
    command = f"{old['command']} && {new['command']}"
    return {
        **old,
        "config": config,
        "variants": variants,
        "targets": targets(summaries),
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (the test setting)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument(
        "--variants", default=None, help="comma-separated subset of: " + ", ".join(NAMES)
    )
    parser.add_argument("--threshold", type=float, default=None, help="override τ_D")
    parser.add_argument("--lr", type=float, default=None, help="override the SGD learning rate")
    parser.add_argument("--beta", type=float, default=None, help="override β₀ (the base KL coef)")
    parser.add_argument(
        "--update", action="store_true", help="merge into the JSON at --out (see merge_results)"
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention

    config, seeds = quick_config() if args.quick else (TrainConfig(), 5)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.threshold is not None:
        config = replace(config, drift=replace(config.drift, threshold=args.threshold))
    if args.lr is not None:
        config = replace(config, lr=args.lr)
    if args.beta is not None:
        config = replace(config, drift=replace(config.drift, beta=args.beta))
    seeds = args.seeds or seeds
    variants = VARIANTS
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - set(NAMES)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {NAMES}")
        variants = tuple(v for v in VARIANTS if v.name in wanted)
    default_name = "reward_hacking_quick" if args.quick else "reward_hacking"
    out_path = args.out or RESULTS / f"{default_name}.json"
    result = run_all(config, seeds, variants)
    result["command"] = "python -m benchmarks.reward_hacking.run " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.update and out_path.exists():
        result = merge_results(json.loads(out_path.read_text()), result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %s", out_path)
    log.info("targets: %s", json.dumps(result["targets"]))
    log.info("%s", markdown_table(result))
    if not args.no_plots:
        from benchmarks.reward_hacking.plots import plot_all

        for path in plot_all(result, out_path.parent, prefix=out_path.stem):
            log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
