"""Several seeds of one comparison, pooled: does arm A lengthen held-out answers more than arm B?

    python -m benchmarks.lm_compare.seeds --arms gprl scalar_grpo \\
        --out benchmarks/results/lm_compare_length_axis_seeds.json DIR [DIR ...]

Per run folder (one seed): the paired held-out token difference tokens(A) − tokens(B) on the
same prompt and sample, with a normal 95% interval over the prompts; each arm's held-out growth
over the base policy; the difference of their mean training length over the last 5 steps.
Pooled over the folders:
- seeds as the units: the mean of the per-seed paired means, with a Student-t 95% interval on
  seeds − 1 degrees of freedom. A trained policy is what varies from seed to seed, so this is
  the interval to quote;
- every prompt pair as a unit, for reference: narrower, because it ignores that the pairs of
  one seed share one trained policy.
Writes the JSON (and a PNG beside it) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.axes import mean_ci
from benchmarks.lm_compare.evaluate import length_stats
from benchmarks.lm_compare.length_control import token_gaps
from benchmarks.lm_compare.report import arm_files, last_train_length


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile for 0.5 < p < 1 (its CDF integrated numerically, then bisected)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 < p < 1 and df >= 1")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # Simpson's rule on [0, x]; the density is smooth there
        n = 4000
        t = torch.linspace(0.0, x, n + 1, dtype=torch.float64)
        f = torch.exp(log_c - (df + 1) / 2 * torch.log1p(t * t / df))
        w = torch.ones(n + 1, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return 0.5 + float((w * f).sum()) * x / (3 * n)

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def seed_row(out: Path, a: str, b: str) -> tuple[dict[str, Any], torch.Tensor]:
    """One run folder's comparison of arm `a` against arm `b` (both must be there), and its
    paired token gaps."""
    arms = arm_files(out)
    missing = [name for name in (a, b) if name not in arms]
    if missing:
        raise SystemExit(f"{out} has no finished arm {missing}: found {sorted(arms)}")
    base = json.loads((out / "base.json").read_text())["answers"]
    settings = json.loads((out / "settings.json").read_text())
    gaps = torch.tensor(token_gaps(arms[a]["answers"], arms[b]["answers"]), dtype=torch.float64)
    base_mean = length_stats(base)["all"]["mean"]

    def growth(name: str) -> float:  # the report's "length vs base"
        return length_stats(arms[name]["answers"])["all"]["mean"] / base_mean - 1

    row = {
        "run": str(out),
        "seed": settings.get("seed"),
        "steps": min(len(arms[n]["steps"]) for n in (a, b)),
        "held_out_paired_tokens": mean_ci(gaps.view(-1, 1))[0],
        "held_out_growth": {a: growth(a), b: growth(b)},
        "train_last5_tokens": {n: last_train_length(arms[n]["steps"]) for n in (a, b)},
    }
    return row, gaps


def pool(rows: list[dict[str, Any]], gaps: list[torch.Tensor]) -> dict[str, Any]:
    """Seeds as units (t interval) and prompt pairs as units (normal interval)."""
    means = torch.tensor([r["held_out_paired_tokens"]["mean"] for r in rows], dtype=torch.float64)
    n = len(rows)
    half = (  # None with one seed: no spread between seeds to scale (JSON has no NaN)
        t_quantile(0.975, n - 1) * float(means.std(unbiased=True)) / math.sqrt(n) if n > 1 else None
    )
    keys = list(rows[0]["train_last5_tokens"])
    train = [r["train_last5_tokens"][keys[0]] - r["train_last5_tokens"][keys[1]] for r in rows]
    return {
        "seeds": n,
        "seeds_as_units": {"mean": float(means.mean()), "ci95": half, "n": n},
        "pairs_as_units": mean_ci(torch.cat(gaps).view(-1, 1))[0],
        "seeds_a_longer_held_out": int((means > 0).sum()),
        "seeds_a_longer_in_training": sum(d > 0 for d in train),
        "train_last5_difference": train,
    }


def analyse(dirs: list[Path], a: str, b: str) -> dict[str, Any]:
    rows, gaps = zip(*(seed_row(d, a, b) for d in dirs), strict=True)
    rows, gaps = list(rows), list(gaps)
    return {"a": a, "b": b, "per_seed": rows, "pooled": pool(rows, gaps)}


def table(res: dict[str, Any]) -> str:
    a, b = res["a"], res["b"]
    lines = [
        f"| seed | steps | held-out growth {a} | held-out growth {b} | paired {a} − {b} (tokens) "
        f"| train, last 5 steps, {a} − {b} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["per_seed"]:
        d, g, t = r["held_out_paired_tokens"], r["held_out_growth"], r["train_last5_tokens"]
        lines.append(
            f"| {r['seed']} | {r['steps']} | {100 * g[a]:+.0f}% | {100 * g[b]:+.0f}% "
            f"| {d['mean']:+.1f} ± {d['ci95']:.1f} | {t[a] - t[b]:+.1f} |"
        )
    p = res["pooled"]
    s, q = p["seeds_as_units"], p["pairs_as_units"]
    interval = "needs 2 seeds" if s["ci95"] is None else f"{s['mean']:+.1f} ± {s['ci95']:.1f}"
    lines.append(
        f"| pooled, seeds as units (t, {p['seeds'] - 1} df) | | | | {interval} "
        f"| {a} longer in {p['seeds_a_longer_in_training']} of {p['seeds']} |"
    )
    lines.append(
        f"| pooled, {q['n']} prompt pairs as units | | | | {q['mean']:+.1f} ± {q['ci95']:.1f} | |"
    )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, p = res["per_seed"], res["pooled"]
    labels = [f"seed {r['seed']}" for r in rows]
    cells = [r["held_out_paired_tokens"] for r in rows]
    if p["seeds_as_units"]["ci95"] is not None:
        labels, cells = [*labels, "pooled (seeds)"], [*cells, p["seeds_as_units"]]
    labels, cells = [*labels, "pooled (pairs)"], [*cells, p["pairs_as_units"]]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.5))
    y = list(range(len(labels)))[::-1]
    for yi, c in zip(y, cells, strict=True):
        ax.errorbar(c["mean"], yi, xerr=c["ci95"], fmt="o", color="C0", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"held-out tokens, {res['a']} − {res['b']} (paired, 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="lm_compare --out folders, one per seed")
    ap.add_argument("--arms", nargs=2, default=["gprl", "scalar_grpo"], metavar=("A", "B"))
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (PNG beside it)")
    args = ap.parse_args(argv)
    res = analyse(args.dirs, *args.arms)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        plot(res, args.out.with_suffix(".png"))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
