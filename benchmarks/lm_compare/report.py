"""`lm_compare.json`, `lm_compare.md` (the table) and `lm_compare.png` from the phase files."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.evaluate import Judge, judge_vs_base, length_stats, verifier_vs_base
from benchmarks.lm_compare.prompts import load_prompts


def evaluation_environment(a: Any) -> dict[str, str]:
    """Where the scores were computed: a verifier's numbers can depend on these."""
    import transformers

    return {
        "device": str(getattr(a, "device", "cpu")),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def arm_files(out: Path) -> dict[str, dict[str, Any]]:
    from benchmarks.lm_compare.arms import ARMS, arm_record

    found = {}
    for name in ARMS:  # a fixed order in every table
        path = arm_record(out, name)
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def last_train_length(steps: list[dict[str, Any]], n: int = 5) -> float:
    """Mean length of the training answers over the last `n` steps (NaN when none logged)."""
    last = [s["mean_length"] for s in steps[-n:] if s.get("mean_length") is not None]
    return sum(last) / len(last) if last else math.nan


def run_dir_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the tools that read a finished run: its folder, threads, the data."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("out", type=Path, help="an lm_compare --out folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--data-root", type=Path, default=None, help="the shared data (default: the run's)"
    )
    return p


def evaluate_all(a: Any, out: Path, client: Any) -> Path:
    prompts = load_prompts(out, a.data_root)["eval"]
    base = json.loads((out / "base.json").read_text())
    arms = arm_files(out)
    answers = {"base": base["answers"], **{k: v["answers"] for k, v in arms.items()}}
    report: dict[str, Any] = {
        "settings": json.loads((out / "settings.json").read_text()),
        "evaluated_with": evaluation_environment(a),
        "mix_before_training": base["mix_before_training"],
        "length": {k: length_stats(v) for k, v in answers.items()},
        "verifier_vs_base": {
            k: verifier_vs_base(client, prompts, v["answers"], base["answers"], a.system)
            for k, v in arms.items()
        },
        "judge_vs_base": None,
        "arms": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in arms.items()},
    }
    if a.judge and arms:
        judge = Judge(a.judge, a.judge_backbone, a.judge_max_length, getattr(a, "device", "cpu"))
        report["judge_vs_base"] = judge_vs_base(judge, prompts, answers, a.system)
        report["judge"] = {"dir": a.judge, "backbone": a.judge_backbone,
                           "max_length": a.judge_max_length}  # fmt: skip
        log = Path(a.judge) / "training_log.json"
        if log.exists():
            report["judge"]["training"] = json.loads(log.read_text()).get("bt")
    report["table"] = table_rows(report)
    path = out / "lm_compare.json"
    path.write_text(json.dumps(report, indent=1))
    (out / "lm_compare.md").write_text(markdown_table(report["table"]) + "\n")
    if arms:
        plot(report, out / "lm_compare.png")
    return path


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    base_len = report["length"]["base"]["all"]["mean"]
    rows = [{"arm": "base", "mean_len": base_len, "len_growth": 0.0}]
    for name, arm in report["arms"].items():
        steps = arm["steps"]
        # Not the TRL reward: the GPM's group scores average to 0 in every group (skew symmetry).
        last = last_train_length(steps)
        judge = report["judge_vs_base"]
        rows.append(
            {
                "arm": name,
                "steps_done": arm.get("steps_done", len(steps)),
                "final_train_length": last,
                "verifier_win_vs_base": report["verifier_vs_base"][name]["win_rate"]["all"],
                "judge_win_vs_base": judge[name]["all"] if judge else None,
                "judge_lc_win_vs_base": _lc(judge, name),
                "mean_len": report["length"][name]["all"]["mean"],
                "len_growth": report["length"][name]["all"]["mean"] / base_len - 1,
                **{
                    f"mean_len_{source}": report["length"][name][source]["mean"]
                    for source in ("instruction", "red_team")
                    if source in report["length"][name]
                },
                "corrections": [(c["step"], c["axis"]) for c in arm["corrections"]],
                "train_wall_s": arm["train_wall_s"],
            }
        )
    return rows


def _lc(judge: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The judge's length-controlled win rate of an arm (None in reports made before it)."""
    lc = (judge or {}).get("length_controlled")
    return lc["arms"][name] if lc else None


def _lc_pct(x: dict[str, Any] | None) -> str:
    if not x:
        return "–"
    lo, hi = x["lc_ci95"]
    return f"{100 * x['lc_win_rate']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _int(x: float | None) -> str:
    return "–" if x is None else str(int(x))


def _pct(x: dict[str, float] | None) -> str:
    return "–" if not x else f"{100 * x['rate']:.1f} ± {100 * x['ci95']:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| arm | steps | train length (last 5 steps) | verifier win vs base % "
        "| judge win vs base % | judge, length-controlled % | held-out length (tokens) "
        "| length vs base | corrections (step, axis) | train time |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        if r["arm"] == "base":
            lines.append(f"| base | – | – | – | – | – | {r['mean_len']:.1f} | – | – | – |")
            continue
        corr = r["corrections"]
        shown = ", ".join(f"({_int(s)}, {_int(ax)})" for s, ax in corr[:4])
        shown += " …" if len(corr) > 4 else ""
        lines.append(
            f"| {r['arm']} | {r['steps_done']} | {r['final_train_length']:.1f} "
            f"| {_pct(r['verifier_win_vs_base'])} "
            f"| {_pct(r['judge_win_vs_base'])} | {_lc_pct(r.get('judge_lc_win_vs_base'))} "
            f"| {r['mean_len']:.1f} "
            f"| {100 * r['len_growth']:+.0f}% "
            f"| {len(corr)}{': ' + shown if corr else ''} | {r['train_wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    for name, arm in arms.items():
        x = [s["step"] for s in arm["steps"]]
        steps = arm["steps"]

        def get(key: str, steps: list = steps) -> list[float]:
            return [math.nan if s.get(key) is None else s[key] for s in steps]

        (line,) = ax[0, 0].plot(x, get("mean_length"), marker=".", label=name)
        if any(s.get("length_group_std") is not None for s in steps):  # older runs lack it
            ax[0, 0].plot(x, get("length_group_std"), ls="--", color=line.get_color(),
                          label=f"{name}, within-group std")  # fmt: skip
        ax[0, 1].plot(x, get("D"), marker=".", label=name)
        k = len([key for key in arm["steps"][0] if key.startswith("alpha_")])
        for axis in range(k):
            style = ["-", "--", ":"][axis % 3]
            ax[0, 2].plot(x, get(f"m_{axis}"), ls=style, label=f"{name} m_{axis}")
        ax[1, 0].plot(x, get("beta"), marker=".", label=name)
    ax[0, 0].set_title("training: completion length, mean and within-group std (tokens)")
    ax[0, 1].set_title("drift D(t) (every arm's monitor)")
    thr = report["settings"]["threshold"]
    ax[0, 1].axhline(thr, color="grey", ls="--", lw=1, label="τ_D")
    ax[0, 2].set_title("weights m_l")
    ax[1, 0].set_title("KL coefficient β")
    names = ["base", *arms]
    lens = [report["length"][n]["all"]["mean"] for n in names]
    ax[1, 1].bar(names, lens, color=[f"C{i}" for i in range(len(names))])
    ax[1, 1].set_title("held-out mean length (tokens)")
    ax[1, 1].tick_params(axis="x", rotation=20)
    width = 0.27
    xs = range(len(arms))
    ver = [report["verifier_vs_base"][n]["win_rate"]["all"]["rate"] for n in arms]
    ax[1, 2].bar([i - width for i in xs], ver, width, label="training verifier")
    judge = report["judge_vs_base"]
    if judge:
        jud = [judge[n]["all"]["rate"] for n in arms]
        ax[1, 2].bar(list(xs), jud, width, label="held-out judge")
    if judge and judge.get("length_controlled"):
        lc = [judge["length_controlled"]["arms"][n] for n in arms]
        err = [[x["lc_win_rate"] - x["lc_ci95"][0] for x in lc],
               [x["lc_ci95"][1] - x["lc_win_rate"] for x in lc]]  # fmt: skip
        ax[1, 2].bar([i + width for i in xs], [x["lc_win_rate"] for x in lc], width, yerr=err,
                     capsize=3, label="judge, length-controlled")  # fmt: skip
    ax[1, 2].axhline(0.5, color="grey", ls="--", lw=1)
    ax[1, 2].set_xticks(list(xs), list(arms), rotation=20)
    ax[1, 2].set_ylim(0, 1.2)  # room above the bars for the legend
    ax[1, 2].set_title("held-out win rate vs base policy")
    for a in ax.flat:
        if a.get_legend_handles_labels()[0]:  # an arm without corrections draws no labelled line
            a.legend(fontsize=7)
    ax[1, 2].legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
