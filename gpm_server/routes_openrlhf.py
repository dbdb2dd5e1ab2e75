"""POST /openrlhf/reward (alias POST /get_reward): OpenRLHF 0.11.2's `--reward.remote_url`.

Payload (OpenRLHF's single-turn executor posts one response per request, any length accepted):

    {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}

`query` is the *templated* prompt followed by the generated response, decoded with the special
tokens kept (e.g. `...<|im_start|>assistant\\nHello!<|im_end|>`). Recovering what to score:

1. **Response.** The text of `query` after `prompt` (if `query` does not start with `prompt`,
   after the last occurrence of the prompt's final characters, e.g. when the prompt was
   left-truncated), cut at the first end-of-turn marker (`<|im_end|>`, `<|eot_id|>`,
   `<end_of_turn>`, `</s>` and every special token of the verifier's tokenizer: EOS, pad, ...),
   then stripped of surrounding whitespace.
2. **Prompt messages.** The verifier applies *its own* chat template, so the policy's templated
   prompt is parsed back into messages: ChatML (`<|im_start|>role\\n...<|im_end|>`), Llama-3
   (`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`) and Gemma
   (`<start_of_turn>role\\n...<end_of_turn>`) markup are recognised; the trailing generation
   header is dropped. Text with none of these markups is one user turn (special tokens removed).
   A label may carry the exact messages instead (`"messages"`), which always wins. Without
   `prompts`, the prompt is the query up to its last assistant header of those markups.

Labels: a JSON object, or a string holding one: `{"reference": str, "messages"?: [...]}`.
- With a reference answer: `rewards` = s(response ≻ reference | x)/τ (the GPM logit) and
  `scores` = P(response ≻ reference) = sigmoid of it; `gpm_has_reference` = 1.
- Without one (no label, an empty or non-JSON string, no `"reference"` key) a scalar reward does
  not exist: `rewards` = `scores` = 0.0 placeholders and `gpm_has_reference` = 0. (NaN would crash
  or poison a plain OpenRLHF run.) The GPRL learner never reads `rewards`: it rebuilds the
  groups from the embeddings. Add `?require_reference=true` to the URL to get a 422 instead.

Answer: `rewards`, `scores` and each `extra_logs` value are **scalars when one query was sent**
(OpenRLHF stores `rewards` as the sample's reward as is; a list would be mangled into a vector)
and lists aligned with `query` otherwise. `extra_logs` keys (the same for every sample, so that
OpenRLHF can concatenate them): `gpm_emb_0..gpm_emb_{2K-1}` (the response's embedding),
`gpm_eig_0..gpm_eig_{K-1}` (λ(x)), `gpm_has_reference`, `gpm_truncated`, `gpm_response_tokens`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Request

from gpm_server.deps import INFERENCE_DEPS, unless_disconnected
from gpm_server.errors import GPMError, too_large
from gpm_server.protocol import Message
from gpm_server.schemas import ErrorResponse, OpenRLHFRewardRequest
from gpm_server.service import Scorer
from gprl_core import gpm_math

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 500, 503)}
router = APIRouter(dependencies=INFERENCE_DEPS, responses=_ERRORS)  # type: ignore[arg-type]

# Chat markups recognised in a policy-templated prompt: (turn regex with role/content, renames).
_FAMILIES: list[tuple[re.Pattern[str], dict[str, str]]] = [
    (re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S), {}),
    (
        re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
        {"ipython": "tool"},
    ),
    (re.compile(r"<start_of_turn>(\w+)\n(.*?)<end_of_turn>", re.S), {"model": "assistant"}),
]
# Generation headers, to split a query sent without its prompt.
_GEN_HEADERS = [
    "<|im_start|>assistant\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<start_of_turn>model\n",
]
_COMMON_END = ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<eos>", "</s>"]
_SPECIAL_RE = re.compile(r"<\|[^|<>]{1,40}\|>|<start_of_turn>\w*|<end_of_turn>|<bos>|<eos>|</?s>")


@dataclass(frozen=True)
class ParsedItem:
    messages: list[Message]
    response: str
    reference: str | None


def special_tokens(backend: Any) -> list[str]:
    """End markers for this verifier: the common chat markers plus its tokenizer's specials."""
    tok = getattr(backend, "tokenizer", None)
    extra = list(getattr(tok, "all_special_tokens", []) or []) if tok is not None else []
    return list(dict.fromkeys([*_COMMON_END, *(t for t in extra if t)]))


def parse_label(label: Any) -> dict[str, Any]:
    """A label → `{"reference"?: str, "messages"?: ...}`; anything else means no reference."""
    if isinstance(label, str):
        text = label.strip()
        if not text.startswith("{"):
            return {}
        try:
            label = json.loads(text)
        except json.JSONDecodeError:
            return {}
    if not isinstance(label, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(label.get("reference"), str):
        out["reference"] = label["reference"]
    messages = label.get("messages", label.get("prompt"))
    if isinstance(messages, str):
        out["messages"] = [{"role": "user", "content": messages}]
    elif isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        if not all("role" in m and "content" in m for m in messages):
            raise ValueError("label messages need a `role` and a `content` each")
        out["messages"] = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return out


def parse_prompt(prompt: str) -> list[Message]:
    """A policy-templated prompt → chat messages (rule in the module docstring)."""
    for pattern, renames in _FAMILIES:
        turns = pattern.findall(prompt)
        if turns:
            return [{"role": renames.get(r, r), "content": c.strip()} for r, c in turns]
    return [{"role": "user", "content": _SPECIAL_RE.sub("", prompt).strip()}]


def prompt_from_query(query: str) -> str:
    """No prompt sent: the query up to its last assistant generation header (or "")."""
    at, header = max((query.rfind(h), h) for h in _GEN_HEADERS)
    return query[: at + len(header)] if at >= 0 else ""


def extract_response(query: str, prompt: str, end_markers: list[str]) -> str:
    """The response inside `query` (rule in the module docstring); 422 if it cannot be found."""
    if prompt and query.startswith(prompt):
        rest = query[len(prompt) :]
    else:
        tail = prompt[-32:]
        at = query.rfind(tail) if tail else 0
        if at < 0:
            raise ValueError("the query does not contain the end of its prompt")
        rest = query[at + len(tail) :]
    cut = min((i for i in (rest.find(m) for m in end_markers) if i >= 0), default=len(rest))
    return rest[:cut].strip()


def parse_items(req: OpenRLHFRewardRequest, end_markers: list[str]) -> list[ParsedItem]:
    n = len(req.query)
    prompts = req.prompts if req.prompts is not None else [""] * n
    labels = req.labels if req.labels is not None else [None] * n
    if len(prompts) != n or len(labels) != n:
        raise GPMError(422, "length_mismatch", "query, prompts and labels must have equal lengths")
    items = []
    for i, (query, prompt, label) in enumerate(zip(req.query, prompts, labels, strict=True)):
        try:
            info = parse_label(label)
        except ValueError as exc:
            raise GPMError(422, "bad_label", str(exc), field=f"labels.{i}") from exc
        if not prompt:
            prompt = prompt_from_query(query)
        try:
            response = extract_response(query, prompt, end_markers)
        except ValueError as exc:
            raise GPMError(422, "bad_query", str(exc), field=f"query.{i}") from exc
        messages = info.get("messages") or parse_prompt(prompt)
        items.append(ParsedItem(messages, response, info.get("reference")))
    return items


async def score_items(scorer: Scorer, items: list[ParsedItem]) -> dict[str, Any]:
    """Embed responses (and references) in one batch → lists aligned with `items`."""
    pairs = [(it.messages, it.response) for it in items]
    fields = [f"query.{i}" for i in range(len(items))]
    refs = [i for i, it in enumerate(items) if it.reference is not None]
    pairs += [(items[i].messages, items[i].reference or "") for i in refs]
    fields += [f"labels.{i}.reference" for i in refs]
    seqs = await scorer.encode(pairs, fields)
    out = await scorer.batcher.submit(seqs)
    n, tau = len(items), scorer.tau
    emb, eig = out.embeddings[:n], out.eigenvalues[:n]  # (n, D), (n, K)
    rewards, scores = torch.zeros(n), torch.zeros(n)
    if refs:
        idx = torch.tensor(refs)
        logit = gpm_math.preference_score(emb[idx], out.embeddings[n:], eig[idx]) / tau
        rewards[idx], scores[idx] = logit, torch.sigmoid(logit)
    logs: dict[str, list[float]] = {}
    for d in range(emb.shape[1]):
        logs[f"gpm_emb_{d}"] = emb[:, d].tolist()
    for k in range(eig.shape[1]):
        logs[f"gpm_eig_{k}"] = eig[:, k].tolist()
    logs["gpm_has_reference"] = [float(it.reference is not None) for it in items]
    logs["gpm_truncated"] = [float(s.truncated) for s in seqs[:n]]
    logs["gpm_response_tokens"] = [float(s.response_tokens) for s in seqs[:n]]
    return {"rewards": rewards.tolist(), "scores": scores.tolist(), "extra_logs": logs}


def _scalars_if_single(result: dict[str, Any], n: int) -> dict[str, Any]:
    if n != 1:
        return result
    return {
        "rewards": result["rewards"][0],
        "scores": result["scores"][0],
        "extra_logs": {k: v[0] for k, v in result["extra_logs"].items()},
    }


async def _reward(body: OpenRLHFRewardRequest, request: Request) -> dict[str, Any]:
    scorer: Scorer = request.app.state.scorer
    limit = scorer.settings.max_responses_per_group * scorer.settings.max_groups_per_request
    if len(body.query) > limit:
        raise too_large("queries", len(body.query), limit, field="query")
    items = parse_items(body, special_tokens(scorer.backend))
    if request.query_params.get("require_reference", "").lower() in ("1", "true", "yes"):
        missing = [i for i, it in enumerate(items) if it.reference is None]
        if missing:
            raise GPMError(
                422,
                "missing_reference",
                'a scalar reward needs a reference answer: label = {"reference": "..."}',
                field=f"labels.{missing[0]}",
            )
    result = await unless_disconnected(request, score_items(scorer, items))
    scorer.metrics.responses_scored.labels(route="/openrlhf/reward").inc(len(items))
    return _scalars_if_single(result, len(items))


@router.post("/openrlhf/reward", summary="OpenRLHF remote reward (one scalar per query)")
async def openrlhf_reward(body: OpenRLHFRewardRequest, request: Request) -> dict[str, Any]:
    """OpenRLHF `--reward.remote_url` payload → scalar `rewards`/`scores` and `extra_logs`
    with the embedding coordinates and eigenvalues (see the module docstring for the rules)."""
    return await _reward(body, request)


@router.post("/get_reward", summary="Alias of /openrlhf/reward (OpenRLHF serve_rm's path)")
async def get_reward(body: OpenRLHFRewardRequest, request: Request) -> dict[str, Any]:
    return await _reward(body, request)
