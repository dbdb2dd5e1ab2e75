"""Aggregate per-seed training logs: per-step mean ± std, per-seed summaries, the targets.

Letters: S seeds, T steps, K proxy axes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

SCALAR_KEYS = (
    "true_quality",
    "proxy_reward",
    "helpfulness",
    "harmlessness",
    "verbosity_fit",
    "log_length",
    "kl",
    "drift",
    "beta",
    "clip_eps",
    "active",
)
VECTOR_KEYS = ("alpha", "axis_var", "m")
SMOOTH = 10  # steps in the moving average used for peak / final


def _round(x: np.ndarray) -> list:
    """4 significant digits, NaN → None (valid JSON)."""
    return [None if not math.isfinite(v) else float(f"{v:.4g}") for v in x.reshape(-1)]


def per_step(logs: list[dict[str, list]]) -> dict[str, dict[str, list]]:
    """Mean and std over seeds per step; vector keys become `key_l` per axis."""
    out: dict[str, dict[str, list]] = {}
    for key in SCALAR_KEYS:
        arr = np.array([log[key] for log in logs], dtype=float)  # [S, T]
        out[key] = _moments(arr)
    for key in VECTOR_KEYS:
        arr = np.array([log[key] for log in logs], dtype=float)  # [S, T, K]
        for axis in range(arr.shape[-1]):
            out[f"{key}_{axis}"] = _moments(arr[..., axis])
    return out


def _moments(arr: np.ndarray) -> dict[str, list]:
    with warnings.catch_warnings():  # D is NaN (all seeds) before the baseline is ready
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return {"mean": _round(np.nanmean(arr, axis=0)), "std": _round(np.nanstd(arr, axis=0))}


def smooth(x: np.ndarray, window: int = SMOOTH) -> np.ndarray:
    """Trailing moving average `[T]` → `[T − window + 1]`."""
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def seed_summary(log: dict[str, list]) -> dict[str, float | int | None]:
    """Peak / final true quality and controller activity of one run.

    peak: max of the 10-step moving average of true quality; final: mean of the last 10% of steps
    (at least 10); drop = (peak − final) / peak; gain_lost = (peak − final) / (peak − initial),
    the share of the improvement over the reference policy that was given back.
    """
    q = np.asarray(log["true_quality"], dtype=float)
    tail = max(SMOOTH, len(q) // 10)
    s = smooth(q)
    peak, final, initial = float(s.max()), float(q[-tail:].mean()), float(q[:SMOOTH].mean())
    active = np.asarray(log["active"], dtype=float)
    drift = np.asarray(log["drift"], dtype=float)
    first = int(np.argmax(active > 0)) if active.any() else None
    return {
        "initial": initial,
        "peak": peak,
        "peak_step": int(s.argmax()) + min(SMOOTH, len(q)) - 1,
        "final": final,
        "drop": (peak - final) / peak,
        "gain_lost": (peak - final) / (peak - initial) if peak > initial else math.nan,
        "final_proxy_reward": float(np.mean(log["proxy_reward"][-tail:])),
        "final_log_length": float(np.mean(log["log_length"][-tail:])),
        "corrections": int(active.sum()),
        "first_correction_step": first,
        "max_drift": float(np.nanmax(drift)) if np.isfinite(drift).any() else None,
        "final_beta": float(log["beta"][-1]),
        "final_m": [float(v) for v in log["m"][-1]],
    }


def variant_summary(seeds: list[dict]) -> dict[str, object]:
    """Mean, std, min and max over seeds of every numeric field of `seed_summary`."""
    out: dict[str, object] = {"per_seed": seeds}
    for key in ("initial", "peak", "final", "drop", "gain_lost", "final_log_length"):
        vals = np.array([s[key] for s in seeds], dtype=float)
        out[key] = {
            "mean": float(np.nanmean(vals)),
            "std": float(np.nanstd(vals)),
            "min": float(np.nanmin(vals)),
            "max": float(np.nanmax(vals)),
        }
    out["seeds_with_corrections"] = sum(s["corrections"] > 0 for s in seeds)
    out["mean_corrections"] = float(np.mean([s["corrections"] for s in seeds]))
    return out


def targets(summaries: dict[str, dict]) -> dict[str, object]:
    """The issue's targets, evaluated on every seed (False where a variant was not run)."""

    def drops(name: str) -> list[float]:
        return [s["drop"] for s in summaries[name]["per_seed"]] if name in summaries else []

    def mean_drop(name: str) -> float:
        return float(np.mean(drops(name))) if name in summaries else math.nan

    full, scalar = drops("gprl_full"), drops("scalar_grpo")
    lo, hi = mean_drop("gprl_full"), mean_drop("scalar_grpo")
    between = {
        name: bool(lo < mean_drop(name) < hi) for name in ("gprl_global", "gprl_no_controller")
    }
    exploit = summaries.get("gprl_full", {}).get("per_seed", [])
    clean = summaries.get("gprl_full_clean", {}).get("per_seed", [])
    return {
        "full_within_10pct_of_peak_all_seeds": bool(full) and all(d <= 0.10 for d in full),
        "scalar_loses_over_a_third_all_seeds": bool(scalar) and all(d > 1 / 3 for d in scalar),
        "in_between_by_mean_drop": between,
        "controller_triggers_on_exploitable_all_seeds": bool(exploit)
        and all(s["corrections"] > 0 for s in exploit),
        "controller_quiet_on_clean_all_seeds": bool(clean)
        and all(s["corrections"] == 0 for s in clean),
    }


def markdown_table(result: dict) -> str:
    """The docs' results table: one row per variant, mean ± std over seeds [min, max]."""

    def cell(stats: dict, scale: float = 1.0, unit: str = "") -> str:
        m, s, lo, hi = (scale * stats[k] for k in ("mean", "std", "min", "max"))
        return f"{m:.3f}{unit} ± {s:.3f} [{lo:.3f}, {hi:.3f}]"

    def pct(stats: dict) -> str:
        m, s, lo, hi = (100 * stats[k] for k in ("mean", "std", "min", "max"))
        return f"{m:.1f}% ± {s:.1f} [{lo:.1f}, {hi:.1f}]"

    rows = [
        "| variant | initial Q | peak Q | final Q | drop from peak | final log-length "
        "| seeds with corrections | first correction (step) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, data in result["variants"].items():
        s = data["summary"]
        seeds = len(s["per_seed"])
        firsts = [p["first_correction_step"] for p in s["per_seed"]]
        first = "—" if all(f is None for f in firsts) else ", ".join(str(f) for f in firsts)
        rows.append(
            f"| `{name}` | {s['initial']['mean']:.3f} | {cell(s['peak'])} | {cell(s['final'])} "
            f"| {pct(s['drop'])} | {s['final_log_length']['mean']:.2f} "
            f"| {s['seeds_with_corrections']}/{seeds} | {first} |"
        )
    return "\n".join(rows)
