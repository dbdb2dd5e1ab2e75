"""Held-out evaluation of every arm's answers against the base policy's answers.

- Length: response tokens (policy tokenizer), mean and quantiles, overall and per source, and
  the share of answers cut at the completion cap.
- The training verifier (over HTTP, `/compare`): P(arm ≻ base), its per-axis terms λ_l s_l and
  λ(x): the reward the arms were trained on, seen against a fixed reference.
- The judge: a Bradley-Terry head trained with `gpm-server train --head bt` on the shared
  data's *test* splits (pairs disjoint from every pair the verifier was trained on), reading whole
  answers (`--judge-max-length`, longer than any prompt plus answer here) and no length feature.
  Judge win rate = the share of (prompt, sample) pairs where r(arm) > r(base).
- How much of each verdict follows length: for both scorers, the correlation over answer pairs
  between the margin (verifier logit, judge r(arm) - r(base)) and the token difference, and the
  win rate split by whether the arm's answer is longer, as long, or shorter than the base's; for
  the judge, its length-controlled win rate too (length_control.py).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.length_control import judge_length_controlled, token_gaps
from benchmarks.lm_compare.prompts import answer_pairs, versus_pairs


class Judge:
    """A scalar reward r(x, y) = w · h(x, y) from a BT head on a causal LM's last hidden state."""

    def __init__(self, directory: str, backbone: str, max_length: int, device: str = "cpu") -> None:
        from safetensors.torch import load_file

        from gpm_server.training.commands import load_backbone
        from gpm_server.training.features import feature_gpm

        self.heads = load_file(str(Path(directory) / "bt_head.safetensors"))
        if "reward_head.weight" not in self.heads:
            raise ValueError(f"{directory}/bt_head.safetensors has no reward_head.weight")
        model, tok = load_backbone(backbone)
        self.gpm = feature_gpm(model.eval(), tok, max_length, model_id=backbone, device=device)
        self.max_length = max_length

    @torch.no_grad()
    def rewards(self, items: list[tuple[Any, str]], token_budget: int = 4096) -> list[float]:
        from gpm_server.training.features import _batches, hidden_at_read_positions

        seqs = self.gpm.encode(items)
        w = self.heads["reward_head.weight"].float()  # (1, H)
        out = torch.full((len(seqs),), math.nan)
        for idx in _batches(seqs, token_budget):
            h_last, _ = hidden_at_read_positions(self.gpm, [seqs[i] for i in idx])
            out[idx] = (h_last.float() @ w.T)[:, 0]
        return out.tolist()


def _quantiles(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": s[-1]}


def _sources(rows: list[dict[str, Any]]) -> list[str | None]:
    """None (all rows) and each prompt source present, in a fixed order."""
    present = {r["source"] for r in rows}
    return [None, *(s for s in ("instruction", "red_team") if s in present)]


def length_stats(answers: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in _sources(answers):
        rows = [r for r in answers if source is None or r["source"] == source]
        lengths = [float(r["tokens"]) for r in rows]
        out[source or "all"] = {
            "mean": statistics.fmean(lengths),
            **_quantiles(lengths),
            "hit_cap": sum(r["hit_cap"] for r in rows) / len(rows),
            "n": len(rows),
        }
    return out


def _win_rate(wins: list[float]) -> dict[str, float]:
    p = statistics.fmean(wins)
    return {
        "rate": p,
        "ci95": 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / len(wins)),
        "n": len(wins),
    }


def _by_source(rows: list[dict[str, Any]], values: list[float]) -> dict[str, dict[str, float]]:
    out = {}
    for source in _sources(rows):
        sel = [
            v for r, v in zip(rows, values, strict=True) if source is None or r["source"] == source
        ]
        out[source or "all"] = _win_rate(sel)
    return out


def _wins(margins: list[float]) -> list[float]:
    """1 where the margin favours the arm, ½ for a tie, 0 otherwise."""
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]


def length_relation(
    arm: list[dict[str, Any]], base: list[dict[str, Any]], margin: list[float]
) -> dict[str, Any]:
    """How a scorer's margin for arm over base (> 0: arm preferred) goes with the length gap.

    `corr`: Pearson correlation of margin with tokens(arm) - tokens(base) over the pairs (None
    when either is constant); `longer` / `same` / `shorter`: the win rate (margin > 0, ties
    half) among the pairs where the arm's answer is longer / as long / shorter, or None.
    """
    d_tok = token_gaps(arm, base)
    x, y = torch.tensor(d_tok, dtype=torch.float64), torch.tensor(margin, dtype=torch.float64)
    corr = None
    if len(d_tok) > 2 and float(x.std()) > 0 and float(y.std()) > 0:
        corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    out: dict[str, Any] = {"corr": corr}
    for name, keep in (("longer", lambda d: d > 0), ("same", lambda d: d == 0),
                       ("shorter", lambda d: d < 0)):  # fmt: skip
        wins = _wins([m for d, m in zip(d_tok, margin, strict=True) if keep(d)])
        out[name] = _win_rate(wins) if wins else None
    return out


def verifier_vs_base(
    client: Any, prompts: list[dict[str, Any]], arm: list[dict], base: list[dict], system: Any
) -> dict[str, Any]:
    """The training verifier's P(arm ≻ base) per answer pair, and its per-axis terms."""
    res = client.compare(versus_pairs(prompts, arm, base, system))
    prob = res.prob_a_wins.tolist()
    wins = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prob]
    axes: dict[str, list[float]] = {}
    for source in _sources(arm):
        sel = [i for i, r in enumerate(arm) if source is None or r["source"] == source]
        axes[source or "all"] = res.per_dimension[sel].nanmean(0).tolist()
    return {
        "win_rate": _by_source(arm, wins),
        "mean_prob": statistics.fmean(prob),
        "mean_weighted_axis_score": axes,  # mean over pairs of λ_l s_l(arm, base)
        "failed": int(res.failed.sum()),
        # the preference logit Σ_l λ_l s_l; a failed pair (NaN) counts as a tie, as before
        "length_relation": length_relation(arm, base, res.score.nan_to_num(0.0).tolist()),
        "eigenvalues_by_source": {
            s: res.eigenvalues[[i for i, r in enumerate(arm) if r["source"] == s]].mean(0).tolist()
            for s in _sources(arm)[1:]
        },
    }


def judge_vs_base(
    judge: Judge, prompts: list[dict[str, Any]], answers: dict[str, list[dict]], system: Any
) -> dict[str, Any]:
    """Judge rewards of every policy's answers (base included) and each arm's win rate."""
    r: dict[str, list[float]] = {}
    for name, rows in answers.items():
        r[name] = judge.rewards(answer_pairs(prompts, rows, system))
    out: dict[str, Any] = {
        "mean_reward": {k: statistics.fmean(v) for k, v in r.items()},
        "rewards": r,  # per answer, in the order of the answer files
        "length_relation": {},
    }
    for name, rows in answers.items():
        if name == "base":
            continue
        margin = [a - b for a, b in zip(r[name], r["base"], strict=True)]
        out[name] = _by_source(rows, _wins(margin))
        out["length_relation"][name] = length_relation(rows, answers["base"], margin)
    out["length_controlled"] = judge_length_controlled(r, answers) if len(answers) > 1 else None
    return out
