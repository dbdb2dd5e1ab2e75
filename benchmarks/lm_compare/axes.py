"""Per-axis verifier terms of each arm against the base policy, with 95% intervals, and the
paired difference between arms: which axis each arm gained or gave up on the held-out prompts.

    python -m benchmarks.lm_compare.axes benchmarks/results/lm_compare_h200/mix

For every held-out (prompt, sample) the service's `/compare` gives λ_l(x)·s_l(arm answer, base
answer) per axis l (its `per_dimension`, whose sum over l is the preference logit); here they are
averaged per source with a normal 95% interval, and, for every two arms, averaged as the paired
difference on the same prompts (the arms share the held-out prompts and the sampling seed, so
the pairing removes the prompt-to-prompt spread). Recomputed from the run's files with the
service started here (the default verifier unless the run named another), so it also checks the
run's own report: on the H200 run they differed, which is how the wrong EOS of transformers 5.17
was found (eos_check.py). Writes
`<dir>/axes.json` and prints the table.

It also pairs the arms' training answers step by step (`mean_length` of each step's G answers):
before the first correction of either arm, and once a correction can have acted. A correction
at step t changes β and ε in step t's update and m from step t + 1, so step t's answers were
still sampled without it. Steps of one run are not independent: read that interval as a rough
scale, not a test.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.prompts import load_prompts, versus_pairs
from benchmarks.lm_compare.report import arm_files, run_dir_parser
from benchmarks.lm_run import start_service
from benchmarks.servers import free_port


def mean_ci(x: torch.Tensor) -> list[dict[str, float]]:
    """Per column of `x` [N, K]: mean and the half-width of a normal 95% interval."""
    n = x.shape[0]
    sd = x.std(0, unbiased=True) if n > 1 else torch.full((x.shape[1],), math.nan)
    return [
        {"mean": float(m), "ci95": float(1.96 * s / math.sqrt(n)), "n": n}
        for m, s in zip(x.mean(0), sd, strict=True)
    ]


def by_source(rows: list[dict[str, Any]], x: torch.Tensor) -> dict[str, Any]:
    out = {"all": mean_ci(x)}
    for source in ("instruction", "red_team"):
        idx = [i for i, r in enumerate(rows) if r["source"] == source]
        if idx:
            out[source] = mean_ci(x[idx])
    return out


def axis_terms(
    client: Any, prompts: list[dict], arm: list[dict], base: list[dict], system: Any
) -> torch.Tensor:
    """[N, K]: λ_l s_l(arm answer, base answer) for every held-out answer pair."""
    return client.compare(versus_pairs(prompts, arm, base, system)).per_dimension.float()


def train_length(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per pair of arms: the step-by-step difference of mean training answer length, split at
    the first step where a correction can have acted."""
    out: dict[str, Any] = {}
    for a, b in itertools.combinations(arms, 2):
        la = [s["mean_length"] for s in arms[a]["steps"]]
        lb = [s["mean_length"] for s in arms[b]["steps"]]
        n = min(len(la), len(lb))
        fixes = [int(c["step"]) for arm in (a, b) for c in arms[arm]["corrections"]]
        split = min(fixes) if fixes else n  # steps 1..split were sampled before any correction
        diff = torch.tensor([float(x - y) for x, y in zip(la[:n], lb[:n], strict=True)]).view(-1, 1)
        windows = {"before_correction": diff[: min(split, n)], "after_correction": diff[split:n]}
        out[f"{a} - {b}"] = {
            "first_correction": min(fixes) if fixes else None,
            **{
                w: {**mean_ci(d)[0], "n_positive": int((d > 0).sum())}
                for w, d in windows.items()
                if d.shape[0]
            },
        }
    return out


def analyse(out: Path, client: Any, data_root: Path | None = None) -> dict[str, Any]:
    settings = json.loads((out / "settings.json").read_text())
    prompts = load_prompts(out, data_root)["eval"]
    base = json.loads((out / "base.json").read_text())["answers"]
    arms = arm_files(out)
    terms = {
        name: axis_terms(client, prompts, arm["answers"], base, settings["system"])
        for name, arm in arms.items()
    }
    report: dict[str, Any] = {
        "vs_base": {name: by_source(base, t) for name, t in terms.items()},
        "paired": {
            f"{a} - {b}": by_source(base, terms[a] - terms[b])
            for a, b in itertools.combinations(terms, 2)
        },
        "train_length": train_length(arms),
    }
    (out / "axes.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> str:
    first = next(iter(report["vs_base"].values()), {"all": []})["all"]
    lines = ["| comparison | source | " + " | ".join(f"axis {k}" for k in range(len(first))) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(first))
    for kind in ("vs_base", "paired"):
        for name, sources in report[kind].items():
            label = name if kind == "paired" else f"{name} - base"
            for source, axes in sources.items():
                cells = " | ".join(f"{a['mean']:+.4f} ± {a['ci95']:.4f}" for a in axes)
                lines.append(f"| {label} | {source} | {cells} |")
    lines += ["", "| training answers, length difference | steps | tokens | longer in |"]
    lines.append("| --- | --- | --- | --- |")
    for name, windows in report.get("train_length", {}).items():
        for w in ("before_correction", "after_correction"):
            if w in windows:
                x = windows[w]
                lines.append(
                    f"| {name} | {w.replace('_', ' ')} | {x['mean']:+.1f} ± {x['ci95']:.1f} "
                    f"| {x['n_positive']} of {x['n']} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = run_dir_parser(__doc__)
    p.add_argument("--gpm-url", default=None, help="a running service (default: start one)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from gprl_client import GPMClient

    torch.set_num_threads(a.threads)
    gpm_model = json.loads((a.out / "settings.json").read_text()).get("gpm_model")
    with tempfile.TemporaryDirectory(prefix="gprl-axes-") as tmp:
        server = None
        if a.gpm_url is None:
            server = start_service(free_port(), gpm_model, Path(tmp), a.threads, a.device)
        try:
            client = GPMClient([a.gpm_url or server.url])
            client.wait_ready(timeout=900)
            report = analyse(a.out, client, a.data_root)
        finally:
            if server is not None:
                server.stop()
    print(table(report))
    return report


if __name__ == "__main__":
    main()
