"""Evaluate GPM (and Bradley-Terry) heads on preference pairs: accuracy, log-loss, baselines.

Works on cached features (`gpm_server.training.features`): the heads read exactly the hidden
states the serving model reads, so the numbers are those of the served model.

Reported per data set and overall (the union of the evaluated pairs):
- `accuracy`: P(chosen ≻ rejected) > 0.5 (an exact tie counts one half), with `accuracy_ci95`
  the half-width of its normal-approximation 95% interval (small test sets are noisy);
- `log_loss`: −log P(chosen ≻ rejected), the hard label (what the data set calls chosen);
- `soft_log_loss`: the same against the soft label `p_chosen` (cross-entropy);
- `length_baseline`: "the longer answer wins" (characters; ties count one half);
- `*_shorter_subset`: both accuracies on the pairs whose chosen answer is the shorter one;
- `mean_eigenvalues`: mean λ(x) per data set (gated GPMs only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gpm_server.checkpoint import LENGTH_HEAD, length_feature
from gprl_core.gpm_math import l2_normalize as _l2_normalize
from gprl_core.gpm_math import preference_score


def _length_term(
    heads: Mapping[str, torch.Tensor],
    feats: Mapping[str, Any],
    side: str,
    length_scale: float | None = None,
) -> torch.Tensor | float:
    """`length_head · length_feature(n)` `[N, D]` for one side of the pairs (0 without one)."""
    if LENGTH_HEAD not in heads:
        return 0.0
    tokens = feats.get(f"full_tokens_{side}")
    if tokens is None:
        raise ValueError("the model has a length head but the features have no token counts")
    return length_feature(tokens, length_scale) @ heads[LENGTH_HEAD].float().T


def gpm_logits(
    heads: Mapping[str, torch.Tensor],
    feats: Mapping[str, Any],
    tau: float,
    normalize: bool,
    length_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(s(chosen ≻ rejected)/τ [N], λ [N, K] or None)` from raw features and GPM heads."""
    w = heads["value_head.weight"].float()
    v_w, v_l = feats["h_chosen"] @ w.T, feats["h_rejected"] @ w.T
    v_w, v_l = (
        v_w + _length_term(heads, feats, "chosen", length_scale),
        v_l + _length_term(heads, feats, "rejected", length_scale),
    )
    if normalize:
        v_w, v_l = _l2_normalize(v_w), _l2_normalize(v_l)
    eig = None
    if "prompt_head.weight" in heads:
        eig = torch.softmax(feats["h_prompt"] @ heads["prompt_head.weight"].float().T, dim=-1)
    return preference_score(v_w, v_l, eig) / tau, eig


def bt_logits(heads: Mapping[str, torch.Tensor], feats: Mapping[str, Any]) -> torch.Tensor:
    """`r(chosen) − r(rejected)` `[N]` for a Bradley-Terry `reward_head.weight` `[1, H]`."""
    w = heads["reward_head.weight"].float()
    r_w = feats["h_chosen"] @ w.T + _length_term(heads, feats, "chosen")
    r_l = feats["h_rejected"] @ w.T + _length_term(heads, feats, "rejected")
    return (r_w - r_l)[:, 0]


def _acc(logits: torch.Tensor) -> float:
    return (
        float(((logits > 0).float() + 0.5 * (logits == 0).float()).mean())
        if len(logits)
        else math.nan
    )


def _ci95(acc: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy over n pairs."""
    return 1.96 * math.sqrt(acc * (1 - acc) / n) if n else math.nan


def pair_metrics(logits: torch.Tensor, feats: Mapping[str, Any], mask: torch.Tensor) -> dict:
    """Metrics for the pairs selected by the boolean `mask` `[N]`."""
    z = logits[mask]
    p = feats["p_chosen"].float()[mask]
    longer = feats["chars_chosen"][mask] - feats["chars_rejected"][mask]
    shorter = longer < 0
    ls = torch.nn.functional.logsigmoid
    return {
        "pairs": int(mask.sum()),
        "accuracy": _acc(z),
        "accuracy_ci95": _ci95(_acc(z), len(z)),
        "log_loss": float(-ls(z).mean()) if len(z) else math.nan,
        "soft_log_loss": float(-(p * ls(z) + (1 - p) * ls(-z)).mean()) if len(z) else math.nan,
        "length_baseline": _acc(longer.float()),
        "pairs_chosen_shorter": int(shorter.sum()),
        "accuracy_shorter_subset": _acc(z[shorter]),
        "length_baseline_shorter_subset": _acc(longer[shorter].float()),
        "truncated_fraction": float(feats["truncated"][mask].float().mean()) if len(z) else 0.0,
    }


def evaluate(
    feats: Mapping[str, Any],
    models: Mapping[str, tuple[str, Mapping[str, torch.Tensor]]],
    tau: float = 0.1,
    l2_normalize: bool = True,
    length_scale: float | None = None,
) -> dict[str, Any]:
    """`models` maps a name to `("gpm" | "bt", heads)`; returns the JSON-ready result dict.
    `length_scale` is the GPM checkpoint's (a BT head's length term is always log(1 + n))."""
    datasets = sorted(set(feats["dataset"]))
    names = list(feats["dataset"])
    masks = {"all": torch.ones(len(names), dtype=torch.bool)}
    for d in datasets:
        masks[d] = torch.tensor([n == d for n in names])
    out: dict[str, Any] = {"datasets": datasets, "models": {}}
    for name, (kind, heads) in models.items():
        if kind == "bt":
            logits, eig = bt_logits(heads, feats), None
        else:
            logits, eig = gpm_logits(heads, feats, tau, l2_normalize, length_scale)
        res: dict[str, Any] = {"kind": kind, "by_dataset": {}}
        for key, mask in masks.items():
            res["by_dataset"][key] = pair_metrics(logits, feats, mask)
            if eig is not None:
                res["by_dataset"][key]["mean_eigenvalues"] = eig[mask].mean(0).tolist()
        out["models"][name] = res
    return out


def plot_results(result: Mapping[str, Any], path: str | Path) -> Path:
    """Bar charts: accuracy per data set (models vs the length baseline) and mean eigenvalues."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["all", *result["datasets"]]
    models = result["models"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    series = [(n, [m["by_dataset"][k]["accuracy"] for k in keys]) for n, m in models.items()]
    first = next(iter(models.values()))["by_dataset"]
    series.append(("longer answer wins", [first[k]["length_baseline"] for k in keys]))
    series.append(("GPM, chosen shorter", [first[k]["accuracy_shorter_subset"] for k in keys]))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        ax1.bar([x + i * width for x in range(len(keys))], vals, width, label=label)
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys, fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.axhline(0.5, color="grey", lw=0.5)
    ax1.set_ylabel("pairwise accuracy")
    ax1.legend(fontsize=7)
    gated = [(n, m) for n, m in models.items() if "mean_eigenvalues" in m["by_dataset"]["all"]]
    if gated:
        name, m = gated[0]
        ds = result["datasets"]
        k = len(m["by_dataset"]["all"]["mean_eigenvalues"])
        for i, d in enumerate(ds):
            ax2.bar(
                [x + i * 0.8 / len(ds) for x in range(k)],
                m["by_dataset"][d]["mean_eigenvalues"],
                0.8 / len(ds),
                label=d,
            )
        ax2.set_xticks(range(k), [f"λ{x}" for x in range(k)])
        ax2.set_title(f"mean eigenvalues ({name})")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return Path(path)
