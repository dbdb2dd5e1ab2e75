"""Which way does each arm's advantage push length? Measured on groups of base-policy answers.

    python -m benchmarks.lm_compare.advantage_length benchmarks/results/lm_compare_length_axis

GRPO raises the probability of answers with a positive advantage, so an advantage that is
larger for the longer answers of a group lengthens the policy, whatever axis it comes from. On
the G base answers to each of the held-out prompts cached by gain_probe (`gain_groups.json`,
`python -m benchmarks.lm_compare.gain_probe DIR --groups 32`), each group's advantages are
computed as each arm computes them at its first step, and correlated with the answers' token
counts within the group:

    r_x(A)  = Pearson correlation over a group's answers of A(i) and n_i   (per group x)
    A       = scalar_grpo: (u − μ_u)/σ_u with u = Σ_l λ_l ŝ_l              (normalization="global")
              gprl:        Σ_l λ_l (ŝ_l − μ_l)/σ_l                          (per_dimension, m = 1)
              gprl_drop:   the same with m = `oracle.drop_weights(K, axis)` (the length axis off)
              axis l:      ŝ_l alone

Reported: the mean of r over groups (95% interval over groups; groups where the answers'
lengths or the advantage do not vary are left out). A positive r for `gprl_drop` means the
content axes alone reward the longer answers of a group. Writes `<dir>/advantage_length.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.axes import mean_ci
from benchmarks.lm_compare.length_axes import encode, run_verifier
from benchmarks.lm_compare.oracle import drop_weights
from benchmarks.lm_compare.prompts import load_prompts
from benchmarks.lm_compare.report import run_dir_parser
from gprl_core.advantages import gprl_advantages
from gprl_core.gpm_math import group_scores
from gprl_core.length_audit import within_group_corr


def grouped(answers: list[dict[str, Any]], half: str = "all") -> list[list[int]]:
    """Row indices of `answers` per prompt, prompts in order; `half` "even" or "odd" keeps the
    groups at even or odd positions (length_free_verifier.py fits on "even", checks on "odd")."""
    index = sorted({r["prompt_index"] for r in answers})
    groups = [[i for i, r in enumerate(answers) if r["prompt_index"] == p] for p in index]
    if half == "all":
        return groups
    if half not in ("even", "odd"):
        raise ValueError(f"half must be 'all', 'even' or 'odd', got {half!r}")
    return groups[half == "odd" :: 2]


def advantages(emb: torch.Tensor, eig: torch.Tensor, axis: int) -> dict[str, torch.Tensor]:
    """`[N, G, 2K]`, `[N, K]` → `[N, G]` first-step advantages per arm and per-axis ŝ_l."""
    k = eig.shape[-1]
    out = {
        "scalar_grpo": gprl_advantages(emb, eig, normalization="global").advantages,
        "gprl": gprl_advantages(emb, eig).advantages,
        "gprl_drop": gprl_advantages(emb, eig, torch.tensor(drop_weights(k, axis))).advantages,
    }
    s_hat = group_scores(emb)  # [N, G, K]
    out.update({f"axis {i}": s_hat[..., i] for i in range(k)})
    return out


def summarise(r: torch.Tensor) -> dict[str, float]:
    kept = r[~torch.isnan(r)]
    if kept.numel() < 2:
        return {"mean": math.nan, "ci95": math.nan, "n": int(kept.numel())}
    return mean_ci(kept.reshape(-1, 1).float())[0]


def analyse(
    gpm: Any,
    out: Path,
    axis: int,
    data_root: Path | None = None,
    groups: str = "all",
    json_path: Path | None = None,
    verifier: str = "the run's",
) -> dict[str, Any]:
    settings = json.loads((out / "settings.json").read_text())
    path = out / "gain_groups.json"
    if not path.exists():
        raise SystemExit(
            f"{path} missing: python -m benchmarks.lm_compare.gain_probe {out} --groups 32"
        )
    answers = json.loads(path.read_text())["answers"]
    prompts = load_prompts(out, data_root)["eval"]
    res = gpm.forward(encode(gpm, prompts, answers, settings["system"]))
    rows = grouped(answers, groups)
    emb = torch.stack([res.embeddings[r] for r in rows]).float()
    eig = torch.stack([res.eigenvalues[r[0]] for r in rows]).float()
    n = torch.tensor([[answers[i]["tokens"] for i in r] for r in rows], dtype=torch.float64)
    report: dict[str, Any] = {
        "verifier": verifier,
        "which_groups": groups,
        "groups": len(rows),
        "G": len(rows[0]),
        "axis_dropped": axis,
        "mean_tokens": float(n.mean()),
        "mean_within_group_token_std": float(n.std(1, correction=0).mean()),
        "corr_with_tokens": {
            name: summarise(within_group_corr(a, n))
            for name, a in advantages(emb, eig, axis).items()
        },
    }
    (json_path or out / "advantage_length.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| advantage | within-group r with token count | groups |", "| --- | --- | --- |"]
    for name, s in report["corr_with_tokens"].items():
        lines.append(f"| {name} | {s['mean']:+.2f} ± {s['ci95']:.2f} | {s['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = run_dir_parser(__doc__)
    p.add_argument("--axis", type=int, default=3, help="the length axis gprl_drop switches off")
    p.add_argument("--gpm-model", type=Path, default=None, help="default: the run's verifier")
    p.add_argument("--groups", choices=("all", "even", "odd"), default="all")
    p.add_argument("--json", type=Path, default=None, help="default: DIR/advantage_length.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.gpm_model is None:
        gpm = run_verifier(a.out)
    else:
        from gpm_server.model import GPM

        gpm = GPM.from_pretrained(str(a.gpm_model))
    name = "the run's" if a.gpm_model is None else str(a.gpm_model)
    report = analyse(gpm, a.out, a.axis, a.data_root, a.groups, a.json, name)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
