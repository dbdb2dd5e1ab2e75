"""Sensitivity of the drift controller to its threshold τ_D: exploitable vs clean proxy.

    python -m benchmarks.reward_hacking.sweep            # 5 seeds × 300 steps per τ_D

For each τ_D: full GPRL on the exploitable proxy (does the controller still catch the verbosity
axis, and in time?) and on the clean proxy (does it stay quiet?). Writes
benchmarks/results/reward_hacking_threshold_sweep.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

import torch

from benchmarks.reward_hacking.run import RESULTS, VARIANTS, run_all
from benchmarks.reward_hacking.train import TrainConfig

log = logging.getLogger("reward_hacking")

THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
SWEPT = ("gprl_full", "gprl_full_clean")


def sweep(config: TrainConfig, seeds: int, thresholds: tuple[float, ...]) -> list[dict]:
    """One row per (τ_D, variant) with the summary figures that matter for the choice of τ_D."""
    variants = tuple(v for v in VARIANTS if v.name in SWEPT)
    rows = []
    for tau in thresholds:
        cfg = replace(config, drift=replace(config.drift, threshold=tau))
        result = run_all(cfg, seeds, variants)
        for name, data in result["variants"].items():
            s = data["summary"]
            firsts = [p["first_correction_step"] for p in s["per_seed"]]
            rows.append(
                {
                    "threshold": tau,
                    "variant": name,
                    "final_quality": s["final"]["mean"],
                    "final_quality_std": s["final"]["std"],
                    "drop": s["drop"]["mean"],
                    "seeds_with_corrections": s["seeds_with_corrections"],
                    "mean_corrections": s["mean_corrections"],
                    "first_correction_steps": firsts,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = sweep(replace(TrainConfig(), steps=args.steps), args.seeds, THRESHOLDS)
    path = RESULTS / "reward_hacking_threshold_sweep.json"
    path.write_text(json.dumps({"seeds": args.seeds, "steps": args.steps, "rows": rows}, indent=1))
    print("| τ_D | variant | final Q | drop | seeds corrected | corrections | first correction |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['threshold']} | {r['variant']} | {r['final_quality']:.3f} ± "
            f"{r['final_quality_std']:.3f} | {100 * r['drop']:.1f}% | "
            f"{r['seeds_with_corrections']} | {r['mean_corrections']:.0f} | "
            f"{r['first_correction_steps']} |"
        )
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
