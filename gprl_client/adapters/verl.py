"""A verl custom reward function backed by the GPM service.

verl (`custom_reward_function.path=.../verl.py`, `custom_reward_function.name=compute_score`)
calls `compute_score(data_source, solution_str, ground_truth, extra_info)` per response with the
naive reward manager, or `compute_score(data_sources, solution_strs, ground_truths, extra_infos)`
with the batch reward manager (`reward_model.reward_manager=batch`); `compute_score` here
accepts both. verl does not pass the prompt: put it in the dataset's `extra_info["prompt"]`
(a string or chat messages).

- With a reference answer in `ground_truth` (a non-empty string): score = s(response ≻
  reference | x)/τ, the GPM logit, with `gpm_prob` = P(response ≻ reference). One `/compare`.
- Batch form without references: the responses of one prompt form a group (verl keeps a prompt's
  n rollouts together) and score = Σ_l λ_l ŝ_l(i)/τ, the mean win logit against the rest of the
  group (the service's `/score` `rewards`); verl's GRPO then normalises it per group. This is
  GRPO on the GPM's scalar score: per-dimension GPRL advantages need the TRL or OpenRLHF
  integrations (verl has no advantage hook for an adapter to use).
- Single form without a reference: no scalar exists; score 0.0 with `gpm_has_reference` = 0.

Results are dicts (`score` plus extra keys verl logs). Service settings as in
`openrlhf_reward_func`: GPRL_GPM_URL (comma-separated), GPRL_GPM_API_KEY.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

from gprl_client.client import GPMClient


@functools.lru_cache(maxsize=1)
def _client() -> tuple[GPMClient, float]:
    urls = os.environ.get("GPRL_GPM_URL", "http://127.0.0.1:8000").split(",")
    client = GPMClient(urls, api_key=os.environ.get("GPRL_GPM_API_KEY"))
    return client, float(client.info()["tau"])


def reset() -> None:
    """Forget the cached client (after changing the environment variables)."""
    _client.cache_clear()


def _prompt(extra_info: Any) -> Any:
    if isinstance(extra_info, dict) and extra_info.get("prompt"):
        return extra_info["prompt"]
    raise ValueError('the GPM needs the prompt: put it in extra_info["prompt"]')


def _reference(ground_truth: Any) -> str | None:
    return ground_truth if isinstance(ground_truth, str) and ground_truth.strip() else None


def _versus_reference(items: list[tuple[Any, str, str]]) -> list[dict[str, float]]:
    client, tau = _client()
    res = client.compare([(p, a, b) for p, a, b in items])
    out = []
    cols = (res.score.tolist(), res.prob_a_wins.tolist(), res.failed.tolist())
    for s, prob, failed in zip(*cols, strict=True):
        score = math.nan if failed else s / tau
        out.append({"score": score, "gpm_prob": prob, "gpm_has_reference": 1.0})
    return out


def _within_groups(prompts: list[Any], responses: list[str]) -> list[dict[str, float]]:
    order: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(repr(p), []).append(i)
    groups = list(order.values())
    client, _ = _client()
    res = client.score([(prompts[rows[0]], [responses[i] for i in rows]) for rows in groups])
    out: list[dict[str, float]] = [{} for _ in responses]
    for n, rows in enumerate(groups):
        for j, i in enumerate(rows):
            out[i] = {"score": float(res.rewards[n, j]), "gpm_has_reference": 0.0}
    return out


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any = None,
    extra_info: Any = None,
    **kwargs: Any,
) -> dict[str, float] | list[dict[str, float]]:
    """verl's custom reward function, single or batch form (see the module docstring)."""
    if isinstance(solution_str, str):
        ref = _reference(ground_truth)
        if ref is None:
            return {"score": 0.0, "gpm_has_reference": 0.0}
        return _versus_reference([(_prompt(extra_info), solution_str, ref)])[0]
    return compute_score_batch(data_source, solution_str, ground_truth, extra_info)


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any] | None,
    extra_infos: Sequence[Any] | None,
) -> list[dict[str, float]]:
    n = len(solution_strs)
    truths = list(ground_truths) if ground_truths is not None else [None] * n
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    prompts = [_prompt(info) for info in infos]
    refs = [_reference(t) for t in truths]
    out: list[dict[str, float]] = [{} for _ in range(n)]
    with_ref = [i for i in range(n) if refs[i] is not None]
    if with_ref:
        scored = _versus_reference(
            [(prompts[i], solution_strs[i], refs[i] or "") for i in with_ref]
        )
        for i, r in zip(with_ref, scored, strict=True):
            out[i] = r
    without = [i for i in range(n) if refs[i] is None]
    if without:
        scored = _within_groups([prompts[i] for i in without], [solution_strs[i] for i in without])
        for i, r in zip(without, scored, strict=True):
            out[i] = r
    return out
