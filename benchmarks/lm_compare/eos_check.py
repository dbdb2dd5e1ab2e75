"""How much the verifier's verdicts move when the EOS it writes at each sequence's end changes:
the run's held-out (arm answer, base answer) pairs scored with the verifier's own EOS and with
`--eos ID`, in process (the service has no such switch, on purpose).

    python -m benchmarks.lm_compare.eos_check benchmarks/results/lm_compare_h200/mix --eos 1

Why: transformers 5.17 converted SmolLM2's GGUF tokenizer with EOS = `<|im_start|>` (id 1)
instead of `<|im_end|>` (id 2), and the H200 run trained and evaluated with that verifier
(docs/gprl_runs.md). Writes `<dir>/eos_check.json`: per arm, the win rate under each EOS (ties,
pairs the verifier cannot tell apart, count half), how often the two agree on the winner, the
correlation of their preference logits, and the per-axis means λ_l s_l under each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.prompts import answer_pairs, load_prompts
from benchmarks.lm_compare.report import arm_files, run_dir_parser
from gprl_core.gpm_math import per_dimension_scores


def win_rate(logits: torch.Tensor) -> float:
    return float(((logits > 0).float() + 0.5 * (logits == 0).float()).mean())


def pair_terms(gpm: Any, prompts: list, arm: list, base: list, system: Any) -> torch.Tensor:
    """[N, K]: λ_l s_l(arm answer, base answer) with the GPM's current EOS."""
    a = gpm.embed(answer_pairs(prompts, arm, system))
    b = gpm.embed(answer_pairs(prompts, base, system))
    return per_dimension_scores(a.embeddings, b.embeddings) * a.eigenvalues


def check(gpm: Any, out: Path, eos: int, data_root: Path | None = None) -> dict[str, Any]:
    settings = json.loads((out / "settings.json").read_text())
    prompts = load_prompts(out, data_root)["eval"]
    base = json.loads((out / "base.json").read_text())["answers"]
    own = gpm.eos_id
    report: dict[str, Any] = {"own_eos": own, "other_eos": eos, "arms": {}}
    for name, arm in arm_files(out).items():
        terms = {}
        for e in (own, eos):
            gpm.eos_id = e
            terms[e] = pair_terms(gpm, prompts, arm["answers"], base, settings["system"])
        gpm.eos_id = own
        x, y = terms[own].sum(-1), terms[eos].sum(-1)
        report["arms"][name] = {
            "n": len(x),
            "win_rate_own": win_rate(x),
            "win_rate_other": win_rate(y),
            "winner_agreement": float((torch.sign(x) == torch.sign(y)).float().mean()),
            "logit_corr": float(torch.corrcoef(torch.stack([x, y]))[0, 1]),
            "axis_mean_own": terms[own].mean(0).tolist(),
            "axis_mean_other": terms[eos].mean(0).tolist(),
        }
    (out / "eos_check.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = run_dir_parser(__doc__)
    p.add_argument("--eos", type=int, required=True, help="the other EOS id to score with")
    a = p.parse_args(argv)
    from gpm_server.app import default_model_path
    from gpm_server.model import GPM

    torch.set_num_threads(a.threads)
    gpm_model = json.loads((a.out / "settings.json").read_text()).get("gpm_model")
    gpm = GPM.from_pretrained(gpm_model or default_model_path())
    report = check(gpm, a.out, a.eos, a.data_root)
    for name, r in report["arms"].items():
        print(
            f"{name}: win {r['win_rate_own']:.3f} (EOS {report['own_eos']}) vs "
            f"{r['win_rate_other']:.3f} (EOS {report['other_eos']}), same winner "
            f"{r['winner_agreement']:.3f}, logit corr {r['logit_corr']:.3f}"
        )
    return report


if __name__ == "__main__":
    main()
