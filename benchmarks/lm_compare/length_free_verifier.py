"""The length-axis verifier with length taken out of its content axes (linearly, within groups).

    python -m benchmarks.lm_compare.length_free_verifier OUT_DIR --run RUN_DIR [--source DIR]

`advantage_length.py` showed that the content axes of the length-axis verifier
(`length_axis_verifier.py`) reward length too: within a group of base answers their group
scores correlate with the token count (r ≈ +0.4 to +0.5), so an advantage with the length axis
switched off still lengthens the policy. This builds a probe verifier whose content coordinates
carry no within-group linear trace of length:

    c = Σ_groups Σ_i (h_i − h̄_g) (y_i − ȳ_g)       h: the backbone state the value head reads
                                                  y = log(1 + n), the length head's feature
    V' = V − (V c) cᵀ / (cᵀ c)                     every value-head row made orthogonal to c

so each content coordinate V'_r · h is uncorrelated with y within the fitting groups (before
the length head and L2 normalisation). The length head, prompt head and backbone are the
source's: axis 3 stays pure length. Fitted on the even-numbered groups of G base answers in
`RUN_DIR/gain_groups.json` (`gain_probe --groups`); `advantage_length.py --gpm-model OUT_DIR
--groups odd` checks it on the others. Constructed, not trained: a probe, not a better verifier.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.advantage_length import grouped
from benchmarks.lm_compare.prompts import answer_pairs, load_prompts
from gpm_server.checkpoint import CONFIG_FILE, VALUE_HEAD, GPMConfig, save_gprl_checkpoint


def within_group_cov(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`[N, G, H]`, `[N, G]` → `[H]`: Σ over groups and answers of (h − h̄_g)(y − ȳ_g)."""
    dh = h.double() - h.double().mean(1, keepdim=True)
    dy = y.double() - y.double().mean(1, keepdim=True)
    return torch.einsum("ngh,ng->h", dh, dy)


def orthogonalise(value: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Every row of `value` `[R, H]` minus its component along `c` `[H]`."""
    c = c.double()
    v = value.double()
    return (v - torch.outer(v @ c, c) / (c @ c)).to(value.dtype)


@torch.inference_mode()
def last_states(gpm: Any, pairs: list, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The states the value head reads `[B, H]` (float32) and the untruncated counts `[B]`."""
    seqs = gpm.encode(pairs)
    states = []
    for i in range(0, len(seqs), batch):
        part = seqs[i : i + batch]
        ids, last_pos, _ = gpm.collate(part)
        hidden = gpm.backbone_hidden(ids)
        states.append(hidden[torch.arange(len(part)), last_pos].float().cpu())
    counts = torch.tensor([s.full_response_tokens for s in seqs], dtype=torch.float64)
    return torch.cat(states), counts


def build(out_dir: Path, source: Path, run: Path, data_root: Path | None = None) -> Path:
    from gpm_server.model import GPM

    gpm = GPM.from_pretrained(str(source))
    settings = json.loads((run / "settings.json").read_text())
    answers = json.loads((run / "gain_groups.json").read_text())["answers"]
    prompts = load_prompts(run, data_root)["eval"]
    groups = grouped(answers, "even")
    rows = [i for g in groups for i in g]
    h, n = last_states(gpm, answer_pairs(prompts, [answers[i] for i in rows], settings["system"]))
    g = len(groups[0])
    c = within_group_cov(h.view(len(groups), g, -1), torch.log1p(n).view(len(groups), g))
    heads = gpm.heads()
    heads[VALUE_HEAD] = orthogonalise(heads[VALUE_HEAD], c)
    config = GPMConfig.from_dict(json.loads((source / CONFIG_FILE).read_text()))
    out = save_gprl_checkpoint(out_dir, heads, config)
    fit = {"source": str(source), "run": str(run), "fit_groups": len(groups), "G": g}
    (out / "length_free_fit.json").write_text(json.dumps(fit, indent=1))
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--run", type=Path, required=True, help="lm_compare folder with gain_groups")
    p.add_argument("--source", type=Path, default=Path("benchmarks/results/length_axis_verifier"))
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = build(a.out, a.source, a.run, a.data_root)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
