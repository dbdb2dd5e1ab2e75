"""`gprl audit-length`: which axes of a running GPM service pay for answer length, before training.

    gprl audit-length --groups samples.jsonl [--url http://127.0.0.1:8000] [--json audit.json]

`samples.jsonl` holds one group per line, `{"prompt": ..., "responses": [...]}` (the `/score`
group format; `prompt` a string or chat messages): several answers your policy sampled for each
prompt, as GRPO would. An optional `"tokens": [...]` per group gives each answer's length in the
policy's tokens; without it the service's counts are used, which stop at its `max_length` (the
command says how many answers were cut). The service scores the groups, and
`gprl_core.length_audit` correlates each axis's term λ_l ŝ_l with the answers' token counts
within each group. Axes where length explains most of the term are flagged, and the command
prints the `axis_prior` that switches them off from the first step (`gprl train
--drift.axis-prior ...`, or `DriftConfig(axis_prior=...)` in the TRL adapter). Exit status 0
when the audit ran (flagged or not; `--json` has the verdict), 2 on bad input or when the
service could score no group.

The service's telemetry also reports a length correlation per axis, pooled over every response
of a step (between prompts too); this one is within groups, which is what group-relative
advantages see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from gprl_client.client_core import GPMRequestError, GPMUnavailableError
from gprl_core.length_audit import DEFAULT_THRESHOLD, LengthAudit, length_audit


def read_groups(path: Path) -> list[dict[str, Any]]:
    """Groups from a JSONL file (or one JSON list); a clear error names the first bad line.
    `tokens`, if given, must be given for every group, one count >= 0 per response."""
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(stripped)
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not JSON ({err.msg})") from None
    groups = []
    for line, row in numbered:
        ok = isinstance(row, dict) and "prompt" in row and isinstance(row.get("responses"), list)
        if not ok or not all(isinstance(r, str) for r in row["responses"]):
            raise ValueError(f'{path}:{line}: expected {{"prompt": ..., "responses": [str, ...]}}')
        if len(row["responses"]) < 2:
            raise ValueError(f"{path}:{line}: a group needs at least 2 responses to compare")
        group = {"prompt": row["prompt"], "responses": row["responses"]}
        if "tokens" in row:
            tokens = row["tokens"]
            ok = isinstance(tokens, list) and len(tokens) == len(row["responses"])
            if not ok or not all(isinstance(t, int) and t >= 0 for t in tokens):
                msg = "tokens must be one integer >= 0 per response"
                raise ValueError(f"{path}:{line}: {msg}")
            group["tokens"] = tokens
        groups.append(group)
    if not groups:
        raise ValueError(f"{path}: no groups")
    if len({"tokens" in g for g in groups}) > 1:
        raise ValueError(f"{path}: give tokens for every group or for none")
    return groups


def token_counts(groups: list[dict[str, Any]], res: Any) -> tuple[torch.Tensor, str]:
    """`[N, G]` lengths (NaN where padded or unscored) and where they came from."""
    if "tokens" in groups[0]:
        n = torch.full(res.valid.shape, torch.nan, dtype=torch.float64)
        for x, g in enumerate(groups):
            n[x, : len(g["tokens"])] = torch.tensor(g["tokens"], dtype=torch.float64)
        return torch.where(res.valid, n, torch.nan), "the file's tokens"
    counts = torch.where(res.valid, res.response_tokens.double(), torch.nan)
    return counts, "the service's token counts"


def table(audit: LengthAudit) -> str:
    lines = [
        "| axis | r with tokens (95%) | groups | share of spread | mean λ | flagged |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in audit.axes:
        r = "n/a" if a.groups == 0 else f"{a.corr:+.2f} ± {a.ci95:.2f}"
        flag = "yes" if a.axis in audit.flagged else ""
        lines.append(
            f"| {a.axis} | {r} | {a.groups} | {a.share:.3f} | {a.mean_eigenvalue:.3f} | {flag} |"
        )
    return "\n".join(lines)


def advice(audit: LengthAudit) -> str:
    if not audit.flagged:
        return f"no axis has r >= {audit.threshold:g}: no prior suggested"
    if audit.prior is None:
        return "every axis pays for length: a per-axis prior cannot separate length from content"
    prior = ",".join(f"{m:.6g}" for m in audit.prior)
    out = [
        f"axes {audit.flagged} pay for length; to train without them from the first step:",
        f"  gprl train --drift.axis-prior {prior} -- ...",
        f"  GPRLGRPOTrainer(..., drift_config=drift_config('project', axis_prior=({prior})))",
    ]
    if audit.share_dropped > 0.5:
        out.append(
            f"warning: the flagged axes carry {audit.share_dropped:.0%} of the within-group spread;"
            " switching them off also removes most of the reward's content signal"
        )
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gprl audit-length", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=Path, required=True, help="JSONL: {prompt, responses} per line")
    p.add_argument(
        "--url",
        default=os.environ.get("GPRL_GPM_URL", "http://127.0.0.1:8000"),
        help="the GPM service (default: $GPRL_GPM_URL or http://127.0.0.1:8000)",
    )
    p.add_argument("--api-key", default=os.environ.get("GPRL_GPM_API_KEY"))
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="flag r >= this")
    p.add_argument("--min-groups", type=int, default=4, help="groups an axis needs to be flagged")
    p.add_argument("--json", type=Path, default=None, help="also write the audit here")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    return p


def audit_main(argv: list[str], client: Any = None) -> int:
    a = parser().parse_args(argv)
    try:
        groups = read_groups(a.groups)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        print(f"gprl audit-length: {err}", file=sys.stderr)
        return 2
    if client is None:
        from gprl_client.client import GPMClient

        client = GPMClient(a.url.split(","), api_key=a.api_key, timeout=a.timeout)
    try:
        res = client.score([{"prompt": g["prompt"], "responses": g["responses"]} for g in groups])
    except (GPMUnavailableError, GPMRequestError) as err:
        print(f"gprl audit-length: the service could not score the groups: {err}", file=sys.stderr)
        return 2
    if res.num_failed == len(groups):
        print(f"gprl audit-length: no group could be scored: {res.errors[0]}", file=sys.stderr)
        return 2
    tokens, source = token_counts(groups, res)
    try:
        audit = length_audit(res.group_scores, res.eigenvalues, tokens, a.threshold, a.min_groups)
    except ValueError as err:
        print(f"gprl audit-length: {err}", file=sys.stderr)
        return 2
    truncated = int((res.truncated & res.valid).sum())
    print(f"{len(groups)} groups ({res.num_failed} not scored), K = {res.k}, model {res.model}")
    print(f"lengths: {source}")
    if truncated:
        cut = "the service scored only their start"
        if "tokens" not in groups[0]:
            cut += " and counts only that: pass tokens in the file, or raise its --max-length"
        print(f"{truncated} answers were cut at the service's max_length: {cut}")
    print(table(audit))
    print(advice(audit))
    if a.json is not None:
        report = {"url": a.url, "model": res.model, "unscored_groups": res.num_failed}
        report |= {"lengths": source, "truncated_answers": truncated}
        a.json.write_text(json.dumps({**report, **audit.to_dict()}, indent=1))
    return 0
