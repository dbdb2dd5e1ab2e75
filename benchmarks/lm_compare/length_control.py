"""Length-controlled judge win rates: what the judge would prefer if arm and base answers were
equally long (the question length-controlled AlpacaEval asks, arXiv 2404.04475).

    python -m benchmarks.lm_compare.length_control benchmarks/results/lm_compare_cpu256

The judge is a Bradley-Terry head, so for every held-out pair it gives a probability
y_i = σ(r(arm answer) − r(base answer)). A generalised linear model explains those with one
intercept per arm and one length term shared by all arms of the run (the length bias is the
judge's, not an arm's):

    P_i = σ(θ_arm(i) + φ · tanh(Δ_i / s))      Δ_i = tokens(arm) − tokens(base), s = std of Δ

fitted by maximum likelihood with y_i as soft targets (Newton's method). The length-controlled
win rate of an arm is σ(θ_arm): the model's prediction at Δ = 0. With φ = 0 it equals the mean
of y_i, the judge's uncontrolled (soft) win rate, so the two columns differ by length alone.
Intervals: percentiles of a bootstrap over held-out pairs (the same resample for every arm, as
they answer the same prompts). Caveat: removing everything length explains also removes quality
that comes with length; read it next to the matched-length split of `length_relation`.

Reads `lm_compare.json` (the judge's rewards per answer) and the answer files; writes
`<dir>/length_controlled.json` and prints a table. `evaluate.judge_vs_base` calls
`length_controlled` too, so every new report carries it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

BOOTSTRAP = 1000


def design(arm_of: list[int], n_arms: int, gaps: torch.Tensor, scale: float) -> torch.Tensor:
    """Columns: one indicator per arm, then tanh(Δ / s)."""
    x = torch.zeros(len(arm_of), n_arms + 1, dtype=torch.float64)
    x[torch.arange(len(arm_of)), torch.tensor(arm_of)] = 1.0
    x[:, -1] = torch.tanh(gaps / scale) if scale > 0 else 0.0
    return x


def fit_glm(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6, iters: int = 50) -> torch.Tensor:
    """Logistic regression of soft targets y ∈ [0, 1] on x by Newton's method (a tiny ridge
    keeps it defined when the length column is constant or an arm always wins)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge * w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + ridge * eye
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return w


def _fit(
    margins: dict[str, torch.Tensor], gaps: dict[str, torch.Tensor], scale: float
) -> torch.Tensor:
    names = list(margins)
    arm_of = [i for i, k in enumerate(names) for _ in range(len(margins[k]))]
    x = design(arm_of, len(names), torch.cat([gaps[k] for k in names]), scale)
    y = torch.sigmoid(torch.cat([margins[k] for k in names]))
    return fit_glm(x, y)


def _ci95(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.quantile(torch.tensor([0.025, 0.975], dtype=x.dtype))]


def length_controlled(
    margins: dict[str, list[float]], gaps: dict[str, list[float]], seed: int = 0
) -> dict[str, Any]:
    """`margins[arm][i]`: judge r(arm) − r(base) on pair i; `gaps[arm][i]`: the token gap.
    Every arm has the same pairs in the same order."""
    m = {k: torch.tensor(v, dtype=torch.float64) for k, v in margins.items()}
    g = {k: torch.tensor(v, dtype=torch.float64) for k, v in gaps.items()}
    sizes = {len(v) for v in m.values()} | {len(v) for v in g.values()}
    if len(sizes) != 1 or set(m) != set(g) or not m:
        raise ValueError("every arm needs a margin and a token gap for the same pairs")
    n = sizes.pop()
    scale = float(torch.cat(list(g.values())).std()) if n * len(g) > 1 else 0.0
    w = _fit(m, g, scale)
    gen = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(BOOTSTRAP):
        idx = torch.randint(0, n, (n,), generator=gen)
        boot.append(
            _fit({k: v[idx] for k, v in m.items()}, {k: v[idx] for k, v in g.items()}, scale)
        )
    b = torch.stack(boot)
    arms = {
        k: {
            "lc_win_rate": float(torch.sigmoid(w[i])),
            "lc_ci95": _ci95(torch.sigmoid(b[:, i])),
            "soft_win_rate": float(torch.sigmoid(m[k]).mean()),
            "mean_gap_tokens": float(g[k].mean()),
            "n": n,
        }
        for i, k in enumerate(m)
    }
    return {
        "length_coef": float(w[-1]),
        "length_coef_ci95": _ci95(b[:, -1]),
        "gap_scale_tokens": scale,
        "bootstrap": BOOTSTRAP,
        "arms": arms,
    }


def token_gaps(arm: list[dict[str, Any]], ref: list[dict[str, Any]]) -> list[float]:
    """tokens(arm answer) − tokens(ref answer), pair by pair (same prompt and sample)."""
    return [float(a["tokens"] - b["tokens"]) for a, b in zip(arm, ref, strict=True)]


def judge_length_controlled(
    rewards: dict[str, list[float]], answers: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """From the judge's reward of every answer and the answers (with their `tokens`), keyed by
    policy; "base" is the reference every other policy is paired with, answer by answer."""
    margins, gaps = {}, {}
    for name, rows in answers.items():
        if name == "base":
            continue
        margins[name] = [ra - rb for ra, rb in zip(rewards[name], rewards["base"], strict=True)]
        gaps[name] = token_gaps(rows, answers["base"])  # length_controlled checks both match
    return length_controlled(margins, gaps)


def from_run(out_dir: Any) -> dict[str, Any]:
    """The length-controlled judge win rates of a finished run, from its stored judge rewards."""
    from pathlib import Path

    from benchmarks.lm_compare.report import arm_files

    out = Path(out_dir)
    judged = json.loads((out / "lm_compare.json").read_text()).get("judge_vs_base")
    if not judged or "rewards" not in judged:
        raise ValueError(f"{out}/lm_compare.json has no judge rewards (run with --judge)")
    answers = {"base": json.loads((out / "base.json").read_text())["answers"]}
    answers |= {k: v["answers"] for k, v in arm_files(out).items()}
    return judge_length_controlled(judged["rewards"], answers)


def _main() -> None:
    from benchmarks.lm_compare.report import run_dir_parser

    a = run_dir_parser(__doc__).parse_args()
    res = from_run(a.out)
    (a.out / "length_controlled.json").write_text(json.dumps(res, indent=1))
    lo, hi = res["length_coef_ci95"]
    print(f"length coefficient φ = {res['length_coef']:.2f} [{lo:.2f}, {hi:.2f}], "
          f"s = {res['gap_scale_tokens']:.1f} tokens")  # fmt: skip
    print("| arm | judge soft win % | length-controlled % (95% bootstrap) | mean token gap |")
    print("| --- | --- | --- | --- |")
    for k, v in res["arms"].items():
        lo, hi = v["lc_ci95"]
        print(f"| {k} | {100 * v['soft_win_rate']:.1f} | {100 * v['lc_win_rate']:.1f} "
              f"[{100 * lo:.1f}, {100 * hi:.1f}] | {v['mean_gap_tokens']:+.1f} |")  # fmt: skip
    if not math.isfinite(res["length_coef"]):
        raise SystemExit("the fit did not converge")


if __name__ == "__main__":
    _main()
