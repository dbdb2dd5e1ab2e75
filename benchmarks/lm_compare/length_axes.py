"""How much of each verifier axis is answer length, in process: every held-out (arm, base) pair's
axis term λ_l s_l(arm, base) split into what the arm's token count alone buys and the rest, and
a probe of each axis's length sensitivity on the base answers.

    python -m benchmarks.lm_compare.length_axes benchmarks/results/lm_compare_cpu256_seed2

A verifier with a length head (MODEL_CARD, docs/training.md) embeds an answer as
v(h, n) = normalise(value_head(h) + W_len · (log(1 + n), 1)), h the backbone's state, n the
untruncated token count. Changing n alone (same tokens, same h) isolates length:

- **length part** of a pair, per axis: λ_l [s_l(v(h_a, n_a), v_b) − s_l(v(h_a, n_b), v_b)], what
  the arm answer's own count is worth over the base answer's count with its content held
  fixed; **content part**: λ_l s_l(v(h_a, n_b), v_b). They sum to the pair's axis term.
- **doubling probe**, per base answer and axis: λ_l s_l(v(h, 2n), v(h, n)), the preference of
  an answer for itself with twice the tokens: which axes a length exploit can move.

Why: the drift monitor can only correct an axis it singles out, and per-axis reweighting can only
curb length if length sits on an axis of its own. A verifier without a length head gives 0
everywhere. Writes `<dir>/length_axes.json` and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.axes import by_source
from benchmarks.lm_compare.prompts import answer_pairs, load_prompts
from benchmarks.lm_compare.report import arm_files, run_dir_parser
from gprl_core.gpm_math import per_dimension_scores


def encode(gpm: Any, prompts: list, answers: list, system: Any) -> list:
    return gpm.encode(answer_pairs(prompts, answers, system))


def with_counts(seqs: list, counts: list[int]) -> list:
    """The same sequences, with the token count the length head reads replaced."""
    return [
        dataclasses.replace(s, full_response_tokens=int(n))
        for s, n in zip(seqs, counts, strict=True)
    ]


def split_terms(gpm: Any, arm_seqs: list, base_seqs: list, b: Any) -> dict[str, torch.Tensor]:
    """[N, K] total, length and content parts of λ_l s_l(arm, base); [N] the token gap.
    `b` is `gpm.forward(base_seqs)`, computed once for every arm."""
    n_arm = [s.full_response_tokens for s in arm_seqs]
    n_base = [s.full_response_tokens for s in base_seqs]
    a = gpm.forward(arm_seqs)
    a_at_base_n = gpm.forward(with_counts(arm_seqs, n_base))
    lam = a.eigenvalues
    total = per_dimension_scores(a.embeddings, b.embeddings) * lam
    content = per_dimension_scores(a_at_base_n.embeddings, b.embeddings) * lam
    gap = torch.tensor(n_arm, dtype=torch.float32) - torch.tensor(n_base, dtype=torch.float32)
    return {"total": total, "length": total - content, "content": content, "token_gap": gap}


def doubling(gpm: Any, seqs: list, one: Any) -> torch.Tensor:
    """[N, K]: λ_l s_l(v(h, 2n), v(h, n)) for each sequence; `one` is `gpm.forward(seqs)`."""
    two = gpm.forward(with_counts(seqs, [2 * s.full_response_tokens for s in seqs]))
    return per_dimension_scores(two.embeddings, one.embeddings) * one.eigenvalues


def analyse(gpm: Any, out: Path, data_root: Path | None = None) -> dict[str, Any]:
    settings = json.loads((out / "settings.json").read_text())
    prompts = load_prompts(out, data_root)["eval"]
    base = json.loads((out / "base.json").read_text())["answers"]
    base_seqs = encode(gpm, prompts, base, settings["system"])
    base_out = gpm.forward(base_seqs)
    probe = doubling(gpm, base_seqs, base_out)
    report: dict[str, Any] = {
        "length_head": gpm.length_head is not None,
        "doubling_probe": by_source(base, probe),
        "arms": {},
    }
    for name, arm in arm_files(out).items():
        arm_seqs = encode(gpm, prompts, arm["answers"], settings["system"])
        parts = split_terms(gpm, arm_seqs, base_seqs, base_out)
        report["arms"][name] = {
            "mean_token_gap": float(parts["token_gap"].mean()),
            **{k: by_source(base, parts[k]) for k in ("total", "length", "content")},
        }
    (out / "length_axes.json").write_text(json.dumps(report, indent=1))
    return report


def _cells(axes: list[dict[str, float]]) -> str:
    return " | ".join(f"{a['mean']:+.4f} ± {a['ci95']:.4f}" for a in axes)


def table(report: dict[str, Any]) -> str:
    k = len(report["doubling_probe"]["all"])
    lines = ["| what | source | " + " | ".join(f"axis {i}" for i in range(k)) + " |"]
    lines.append("| --- | --- |" + " --- |" * k)
    for source, axes in report["doubling_probe"].items():
        lines.append(f"| base answer, doubled token count | {source} | {_cells(axes)} |")
    for name, arm in report["arms"].items():
        for part in ("total", "length", "content"):
            lines.append(f"| {name} - base, {part} | all | {_cells(arm[part]['all'])} |")
    return "\n".join(lines)


def run_verifier(out: Path) -> Any:
    """The GPM the run in `out` trained against (its settings' `gpm_model`, else the default)."""
    from gpm_server.app import default_model_path
    from gpm_server.model import GPM

    gpm_model = json.loads((out / "settings.json").read_text()).get("gpm_model")
    return GPM.from_pretrained(gpm_model or default_model_path())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = run_dir_parser(__doc__).parse_args(argv)
    torch.set_num_threads(a.threads)
    report = analyse(run_verifier(a.out), a.out, a.data_root)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
