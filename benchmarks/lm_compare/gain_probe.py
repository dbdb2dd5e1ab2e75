"""Would a gain-based drift signal name the exploited axis? Measured on a finished run's answers.

    python -m benchmarks.lm_compare.gain_probe benchmarks/results/lm_compare_length_axis

Both drift rules read shares of within-group variance, so they are blind when the exploited axis
is the dominant one (default verifier) or once its spread saturates (length-axis verifier):
docs/gprl_runs.md. A gain signal reads where answers *are* on each axis against a fixed reference
instead. With ū the mean embedding of the reference answers (here the base policy's held-out
answers; in training it would be the baseline steps' answers):

    g_l(x)  = λ_l(x) s_l(v_x, ū)           x's preference over the reference on axis l
    shift_l = mean over held-out prompts of g_l(arm answer) − g_l(base answer)   (paired)
    z_l     = shift_l / sd_l               sd_l: spread of g_l over the base answers
    z^w_l   = shift_l / √v_l(0)            v_l(0): the arm's baseline within-group variance of
                                           λ_l ŝ_l (its training record), the monitor's own scale
    noise_l = sd_l / √P · √(r/(2−r) + 1/B) sd of ḡ_l(t) − g_l(0) in training: P prompts a step
                                           (prompt spread dominates), EMA rate r, B baseline steps

The named axis is argmax_l z_l (argmax z^w_l alongside). A signal worth building names the axis
the policy exploits and has shift_l well above noise_l.

noise_l above counts all of sd_l as spread between prompts, an upper bound: a step's G answers
to one prompt average out their own spread. `--groups N` measures the split. It samples G (the
run's `generations`) base-policy answers to each of N held-out prompts, half from each source
(cached in `<dir>/gain_groups.json`), takes g_l's variance between prompts σ²_p and within them σ²_w
(one-way ANOVA), and reports the training noise as √(σ²_p/P + σ²_w/(P·G)) · √(r/(2−r) + 1/B)
too. Writes `<dir>/gain_probe.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.axes import mean_ci
from benchmarks.lm_compare.length_axes import encode, run_verifier
from benchmarks.lm_compare.prompts import load_prompts
from benchmarks.lm_compare.report import arm_files, run_dir_parser
from gprl_core.drift_monitor import deviation_variance_factor
from gprl_core.gpm_math import per_dimension_scores


def gains(out: Any, reference: torch.Tensor) -> torch.Tensor:
    """[N, K]: λ_l(x) s_l(v_x, ū) for each answer of a `gpm.forward` output."""
    scores = per_dimension_scores(out.embeddings, reference.expand_as(out.embeddings))
    return scores * out.eigenvalues


def baseline_within_variance(record: dict[str, Any], steps: int) -> list[float] | None:
    """v_l(0): the mean of the record's first `steps` per-axis variances (None without them)."""
    rows = record.get("steps", [])[:steps]
    k = sum(1 for key in (rows[0] if rows else {}) if key.startswith("var_"))
    if not rows or not k:
        return None
    return [sum(float(r[f"var_{i}"]) for r in rows) / len(rows) for i in range(k)]


def ratios(shift: list[float], noise: list[float]) -> list[float]:
    return [m / n if n > 0 else math.nan for m, n in zip(shift, noise, strict=True)]


def argmax(xs: list[float]) -> int:
    """Index of the largest entry, NaN counting as smallest."""
    return max(range(len(xs)), key=lambda i: -math.inf if math.isnan(xs[i]) else xs[i])


def arm_report(
    g_arm: torch.Tensor, g_base: torch.Tensor, v0: list[float] | None, noise_scale: float
) -> dict[str, Any]:
    diff = mean_ci(g_arm - g_base)
    sd = g_base.std(0, unbiased=True).tolist()
    shift = [d["mean"] for d in diff]
    z = [m / s if s > 0 else math.nan for m, s in zip(shift, sd, strict=True)]
    zw = None
    if v0 is not None:
        zw = [m / math.sqrt(v) if v > 0 else math.nan for m, v in zip(shift, v0, strict=True)]
    noise = [s * noise_scale for s in sd]
    return {
        "shift": diff,
        "sd_base": sd,
        "z": z,
        "z_within": zw,
        "training_noise": noise,
        "shift_over_noise": ratios(shift, noise),
        "named_axis": argmax(z),
        "named_axis_within": None if zw is None else argmax(zw),
    }


def variance_components(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-way ANOVA of `g` [N prompts, G answers, K]: (σ²_p, σ²_w) per axis, the variance of the
    prompt means net of their share of within-prompt noise (floored at 0) and the mean
    within-prompt variance."""
    within = g.var(1, unbiased=True).mean(0)
    between = (g.mean(1).var(0, unbiased=True) - within / g.shape[1]).clamp_min(0)
    return between, within


def balanced(prompts: list[dict[str, Any]], n: int) -> list[int]:
    """Indices of `n` held-out prompts taken from each source in turn (held-out sets are stored
    source by source, and training alternates them), in their stored order."""
    by_source: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_source.setdefault(p["source"], []).append(i)
    queues, chosen = list(by_source.values()), []
    while len(chosen) < min(n, len(prompts)):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return sorted(chosen)


def sample_groups(out: Path, prompts: list, settings: dict[str, Any], n: int) -> list[dict] | None:
    """G base-policy answers to each of `n` held-out prompts, half from each source, cached in
    `<dir>/gain_groups.json` (sampled once; the run's generation settings and seed). With n = 0
    only the cache is read (None without it)."""
    path = out / "gain_groups.json"
    if path.exists():
        return json.loads(path.read_text())["answers"]
    if not n:
        return None
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.lm_compare.arms import generate_answers
    from benchmarks.lm_run import default_policy

    policy = settings.get("policy") or default_policy()
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    a = argparse.Namespace(**{**settings, "eval_samples": settings["generations"]})
    index = balanced(prompts, n)
    sub = [prompts[i] for i in index]
    answers = generate_answers(model, AutoTokenizer.from_pretrained(policy), sub, a)
    for r in answers:
        r["prompt_index"] = index[r["prompt_index"]]
    path.write_text(json.dumps({"prompts": n, "answers": answers}, indent=1))
    return answers


def group_noise(
    gpm: Any, answers: list[dict], prompts: list, settings: dict[str, Any], reference: torch.Tensor
) -> dict[str, Any]:
    """σ²_p, σ²_w of g_l on G sampled answers per prompt (`sample_groups`)."""
    g = gains(gpm.forward(encode(gpm, prompts, answers, settings["system"])), reference)
    index = sorted({r["prompt_index"] for r in answers})
    rows = [[i for i, r in enumerate(answers) if r["prompt_index"] == p] for p in index]
    between, within = variance_components(torch.stack([g[r] for r in rows]))
    return {"prompts": len(rows), "between": between.tolist(), "within": within.tolist()}


def analyse(gpm: Any, out: Path, data_root: Path | None = None, groups: int = 0) -> dict[str, Any]:
    settings = json.loads((out / "settings.json").read_text())
    prompts = load_prompts(out, data_root)["eval"]
    base = json.loads((out / "base.json").read_text())["answers"]
    base_out = gpm.forward(encode(gpm, prompts, base, settings["system"]))
    reference = base_out.embeddings.mean(0, keepdim=True)
    g_base = gains(base_out, reference)
    r, b = settings.get("ema_rate", 0.25), settings.get("baseline_steps", 4)
    p, k = settings.get("prompts_per_step", 2), settings.get("generations", 4)
    ema = math.sqrt(deviation_variance_factor(r, b))
    answers = sample_groups(out, prompts, settings, groups)
    split = measured = None
    if answers is not None:
        split = group_noise(gpm, answers, prompts, settings, reference)
        pairs = zip(split["between"], split["within"], strict=True)
        measured = [ema * math.sqrt(bp / p + w / (p * k)) for bp, w in pairs]
    report: dict[str, Any] = {
        "reference": "mean embedding of the base policy's held-out answers",
        "noise_model": {"ema_rate": r, "baseline_steps": b, "prompts_per_step": p, "G": k},
        "variance_split": split,
        "arms": {},
    }
    for name, arm in arm_files(out).items():
        arm_out = gpm.forward(encode(gpm, prompts, arm["answers"], settings["system"]))
        v0 = baseline_within_variance(arm, b)
        rep = arm_report(gains(arm_out, reference), g_base, v0, ema / math.sqrt(p))
        if measured is not None:
            rep["training_noise_split"] = measured
            rep["shift_over_noise_split"] = ratios([d["mean"] for d in rep["shift"]], measured)
        report["arms"][name] = rep
    (out / "gain_probe.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> str:
    arms = report["arms"]
    k = len(next(iter(arms.values()))["z"]) if arms else 0
    head = "| arm | what | " + " | ".join(f"axis {i}" for i in range(k)) + " | named |"
    lines = [head, "| --- | --- |" + " --- |" * (k + 1)]
    for name, r in arms.items():
        cells = " | ".join(f"{d['mean']:+.4f} ± {d['ci95']:.4f}" for d in r["shift"])
        lines.append(f"| {name} | shift vs base | {cells} | |")
        z = " | ".join(f"{x:+.2f}" for x in r["z"])
        lines.append(f"| {name} | z (base spread) | {z} | {r['named_axis']} |")
        if r["z_within"] is not None:
            lines.append(
                f"| {name} | z (within-group, v(0)) | "
                + " | ".join(f"{x:+.2f}" for x in r["z_within"])
                + f" | {r['named_axis_within']} |"
            )
        ratio = " | ".join(f"{x:+.2f}" for x in r["shift_over_noise"])
        lines.append(f"| {name} | shift / training noise | {ratio} | |")
        if "shift_over_noise_split" in r:
            ratio = " | ".join(f"{x:+.2f}" for x in r["shift_over_noise_split"])
            lines.append(f"| {name} | shift / training noise (measured split) | {ratio} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = run_dir_parser(__doc__)
    what = "sample G answers to this many held-out prompts to split the noise"
    p.add_argument("--groups", type=int, default=0, help=what)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    report = analyse(run_verifier(a.out), a.out, a.data_root, a.groups)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
