"""Replay a run's recorded per-step axis variances through both controller rules.

    python -m benchmarks.lm_compare.replay benchmarks/results/lm_run/lm_run.json

The monitor and controller are pure functions of the per-step mean axis variance
(`adv/mean_axis_var_l` in every run record), so a replay gives exactly the decisions either rule
would have taken on that run. While a rule makes no correction it leaves m, β and ε at their
baselines, so the run it would have produced is the recorded one step for step: a replay with no
correction *is* that rule's run. After a first correction the replay is only indicative (the
policy would have changed). Prints, and returns, the corrections per rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gprl_client.drift import DriftController, DriftMonitor, drift_config


def axis_variances(steps: list[dict[str, Any]]) -> list[list[float]]:
    k = len([key for key in steps[0] if key.startswith("adv/mean_axis_var_")])
    return [[float(s[f"adv/mean_axis_var_{axis}"]) for axis in range(k)] for s in steps]


def replay(variances: list[list[float]], preset: str, **knobs: Any) -> dict[str, Any]:
    config = drift_config(preset, **knobs)
    monitor, controller = (
        DriftMonitor(len(variances[0]), config),
        DriftController(len(variances[0]), config),
    )
    corrections, drift = [], []
    for step, v in enumerate(variances, start=1):
        m = monitor.update(v)
        c = controller.update(m)
        drift.append(m.drift)
        if c.active:
            corrections.append({"step": step, "axis": m.over_exploited, "D": m.drift})
    finite = [d for d in drift if d == d]
    return {
        "preset": preset,
        "knobs": knobs,
        "steps": len(variances),
        "corrections": corrections,
        "max_D": max(finite) if finite else None,
        "tau_D": controller.state.threshold,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", type=Path, help="lm_run.json or an lm_compare arms/<arm>.json")
    p.add_argument("--baseline-steps", type=int, default=4)
    p.add_argument("--ema-rate", type=float, default=0.25)
    p.add_argument("--threshold", type=float, default=0.02)
    p.add_argument("--min-baseline-share", type=float, default=0.0, help="see DriftConfig")
    a = p.parse_args(argv)
    steps = json.loads(a.record.read_text())["steps"]
    knobs = {"baseline_steps": a.baseline_steps, "ema_rate": a.ema_rate, "threshold": a.threshold}
    if a.min_baseline_share:
        knobs["min_baseline_share"] = a.min_baseline_share
    out = [replay(axis_variances(steps), preset, **knobs) for preset in ("paper", "project")]
    for r in out:
        print(
            f"{r['preset']}: {len(r['corrections'])} corrections in {r['steps']} steps, "
            f"max D {r['max_D']:.4g} (τ_D {r['tau_D']:.4g}): {r['corrections']}"
        )
    return out


if __name__ == "__main__":
    main()
