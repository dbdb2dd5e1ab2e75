"""Drift-controller sensitivity: its threshold τ_D, and which of its levers does the work.

    python -m benchmarks.reward_hacking.sweep                     # τ_D sweep
    python -m benchmarks.reward_hacking.sweep --what components   # m only vs β/ε only

Full GPRL on the exploitable proxy (does the controller still catch the verbosity axis, and in
time?) and on the clean proxy (does it stay quiet?), 5 seeds × 300 steps per setting. Writes
benchmarks/results/reward_hacking_{threshold_sweep,components}.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

import torch

from benchmarks.reward_hacking.run import RESULTS, VARIANTS, run_all
from benchmarks.reward_hacking.train import TrainConfig
from gprl_client.drift import DriftConfig

log = logging.getLogger("reward_hacking")

THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
SWEPT = ("gprl_full", "gprl_full_clean")


def settings(what: str) -> dict[str, DriftConfig]:
    """Label → controller config: τ_D values, or the controller with one lever switched off."""
    base = DriftConfig()
    if what == "thresholds":
        return {str(tau): replace(base, threshold=tau) for tau in THRESHOLDS}
    return {
        "m and β/ε (default)": base,
        "m only (β, ε fixed)": replace(base, beta_max=base.beta, clip_eps_min=base.clip_eps),
        "β/ε only (m fixed)": replace(base, weight_step=0.0),
    }


def sweep(config: TrainConfig, seeds: int, configs: dict[str, DriftConfig]) -> list[dict]:
    """One row per (setting, variant) with the summary figures that matter for the choice."""
    variants = tuple(v for v in VARIANTS if v.name in SWEPT)
    rows = []
    for label, drift in configs.items():
        result = run_all(replace(config, drift=drift), seeds, variants)
        for name, data in result["variants"].items():
            s = data["summary"]
            firsts = [p["first_correction_step"] for p in s["per_seed"]]
            rows.append(
                {
                    "setting": label,
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
    parser.add_argument("--what", choices=("thresholds", "components"), default="thresholds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = sweep(replace(TrainConfig(), steps=args.steps), args.seeds, settings(args.what))
    name = "threshold_sweep" if args.what == "thresholds" else "components"
    path = RESULTS / f"reward_hacking_{name}.json"
    path.write_text(
        json.dumps({"seeds": args.seeds, "steps": args.steps, "rows": rows}, indent=1) + "\n"
    )
    print("| setting | variant | final Q | drop | seeds corrected | corrections | first at step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['setting']} | {r['variant']} | {r['final_quality']:.3f} ± "
            f"{r['final_quality_std']:.3f} | {100 * r['drop']:.1f}% | "
            f"{r['seeds_with_corrections']} | {r['mean_corrections']:.0f} | "
            f"{r['first_correction_steps']} |"
        )
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
