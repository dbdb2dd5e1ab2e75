"""What /score and /compare compute, on top of the batcher and the shared GPM math.

Every score comes from `gprl_core.gpm_math` (one implementation of the formulas). Letters:
N groups, G responses per group, K subspaces, D = 2K.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from gpm_server.batcher import MicroBatcher
from gpm_server.errors import GPMError, too_large
from gpm_server.metrics import Metrics
from gpm_server.protocol import EncodedSequence, GPMBackend, Message, as_messages
from gpm_server.schemas import (
    CompareRequest,
    CompareResponse,
    CompareResult,
    GroupResult,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from gpm_server.settings import Settings
from gprl_core import gpm_math

log = logging.getLogger(__name__)
# Requests with at most this many characters of text are tokenised on the event loop.
INLINE_ENCODE_CHARS = 16_384


def _floats(t: torch.Tensor) -> Any:
    """Tensor → nested lists, NaN → None (JSON has no NaN; "not scored" must not read as 0)."""

    def fix(x: Any) -> Any:
        if isinstance(x, list):
            return [fix(v) for v in x]
        return None if math.isnan(x) else x

    return fix(t.tolist())


def _usage(seqs: Sequence[EncodedSequence]) -> Usage:
    return Usage(
        prompt_tokens=sum(s.prompt_len for s in seqs),
        total_tokens=sum(s.cost for s in seqs),
        sequences=len(seqs),
    )


class Scorer:
    """Encodes off the event loop, checks limits, batches, and turns tensors into answers."""

    def __init__(
        self, backend: GPMBackend, batcher: MicroBatcher, settings: Settings, metrics: Metrics
    ) -> None:
        self.backend = backend
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics

    @property
    def tau(self) -> float:
        return self.backend.info.tau

    async def encode(
        self, pairs: list[tuple[list[Message], str]], fields: list[str]
    ) -> list[EncodedSequence]:
        _check_unicode(pairs, fields)
        started = time.perf_counter()
        if _text_chars(pairs) <= INLINE_ENCODE_CHARS:
            # A small request tokenises in about a millisecond: a thread hop (and the GIL
            # hand-offs it costs the model thread) would cost more than it saves.
            seqs = self.backend.encode(pairs)
        else:
            seqs = await asyncio.to_thread(self.backend.encode, pairs)
        self.metrics.latency.labels(stage="tokenize").observe(time.perf_counter() - started)
        if self.settings.truncation == "reject":
            for seq, name in zip(seqs, fields, strict=True):
                if seq.truncated:
                    raise GPMError(
                        413,
                        "sequence_too_long",
                        f"prompt + response exceed the limit of {self.backend.info.max_length} "
                        "tokens (truncation policy: reject)",
                        field=name,
                    )
        return seqs

    # --- /score ----------------------------------------------------------------------------

    def check_score_limits(self, req: ScoreRequest) -> None:
        s = self.settings
        if len(req.groups) > s.max_groups_per_request:
            raise too_large("groups", len(req.groups), s.max_groups_per_request)
        for g, group in enumerate(req.groups):
            if len(group.responses) > s.max_responses_per_group:
                raise too_large(
                    "responses per group",
                    len(group.responses),
                    s.max_responses_per_group,
                    field=f"groups.{g}.responses",
                )

    async def score(self, req: ScoreRequest) -> tuple[ScoreResponse, list[dict[str, Any]]]:
        """Score all groups; also returns per-group tensors for the telemetry hook."""
        self.check_score_limits(req)
        pairs, fields, sizes = [], [], []
        for g, group in enumerate(req.groups):
            messages = as_messages(_plain(group.prompt))
            for j, response in enumerate(group.responses):
                pairs.append((messages, response))
                fields.append(f"groups.{g}.responses.{j}")
            sizes.append(len(group.responses))
        seqs = await self.encode(pairs, fields)
        out = await self.batcher.submit(seqs)
        self.metrics.responses_scored.labels(route="/score").inc(len(seqs))
        results, tensors, start = [], [], 0
        for group, size in zip(req.groups, sizes, strict=True):
            emb = out.embeddings[start : start + size]  # (G, D)
            eig = out.eigenvalues[start]  # (K,) same for every response of the prompt
            group_seqs = seqs[start : start + size]
            start += size
            result, extra = self._group(group.id, emb, eig, group_seqs, req.return_matrix)
            results.append(result)
            tensors.append(extra)
        response = ScoreResponse(
            model=self.backend.info.model_id,
            k=self.backend.info.k,
            tau=self.tau,
            groups=results,
            usage=_usage(seqs),
        )
        return response, tensors

    def _group(
        self,
        group_id: str | None,
        emb: torch.Tensor,
        eig: torch.Tensor,
        seqs: Sequence[EncodedSequence],
        return_matrix: bool,
    ) -> tuple[GroupResult, dict[str, Any]]:
        """emb `[G, D]`, eig `[K]` → the group's answer and its tensors."""
        scores = gpm_math.group_scores(emb[None])[0]  # (G, K); NaN when G = 1
        rewards = (scores * eig).sum(dim=-1) / self.tau  # (G,)
        matrix = None
        if return_matrix:
            matrix = gpm_math.preference_matrix(emb[None], eig[None], self.tau)[0].tolist()
        tokens = [s.response_tokens for s in seqs]
        result = GroupResult(
            id=group_id,
            eigenvalues=eig.tolist(),
            embeddings=emb.tolist(),
            group_scores=_floats(scores),
            rewards=_floats(rewards),
            matrix=matrix,
            truncated=[s.truncated for s in seqs],
            response_tokens=tokens,
        )
        extra = {"eigenvalues": eig, "group_scores": scores, "response_tokens": tokens}
        return result, extra

    # --- /compare --------------------------------------------------------------------------

    async def compare(self, req: CompareRequest) -> CompareResponse:
        pairs_in = req.as_pairs()
        limit = self.settings.max_pairs_per_request
        if len(pairs_in) > limit:
            raise too_large("pairs", len(pairs_in), limit)
        inline = req.pairs is None
        pairs, fields = [], []
        for p, pair in enumerate(pairs_in):
            messages = as_messages(_plain(pair.prompt))
            pairs += [(messages, pair.a), (messages, pair.b)]
            fields += ["a", "b"] if inline else [f"pairs.{p}.a", f"pairs.{p}.b"]
        seqs = await self.encode(pairs, fields)
        out = await self.batcher.submit(seqs)
        self.metrics.responses_scored.labels(route="/compare").inc(len(seqs))
        emb_a, emb_b = out.embeddings[0::2], out.embeddings[1::2]  # (P, D) each
        eig = out.eigenvalues[0::2]  # (P, K)
        per_dim = gpm_math.per_dimension_scores(emb_a, emb_b) * eig  # (P, K): λ_l s_l(a, b)
        score = gpm_math.preference_score(emb_a, emb_b, eig)  # (P,)
        prob = gpm_math.preference_probability(emb_a, emb_b, eig, self.tau)  # (P,)
        results = [
            CompareResult(
                id=pair.id,
                prob_a_wins=float(prob[p]),
                score=float(score[p]),
                per_dimension=per_dim[p].tolist(),
                eigenvalues=eig[p].tolist(),
                truncated=[seqs[2 * p].truncated, seqs[2 * p + 1].truncated],
            )
            for p, pair in enumerate(pairs_in)
        ]
        return CompareResponse(
            model=self.backend.info.model_id,
            k=self.backend.info.k,
            tau=self.tau,
            results=results,
            usage=_usage(seqs),
        )


def _text_chars(pairs: list[tuple[list[Message], str]]) -> int:
    """Characters to tokenise (distinct prompts once, as `encode` templates them once)."""
    prompts = {id(messages): messages for messages, _ in pairs}
    total = sum(len(response) for _, response in pairs)
    for messages in prompts.values():
        total += sum(len(str(m.get("content") or "")) for m in messages)
    return total


def _check_unicode(pairs: list[tuple[list[Message], str]], fields: list[str]) -> None:
    """422 for text with a lone surrogate (JSON `"\\ud800"` is valid JSON but not Unicode text;
    tokenizers and UTF-8 encoders reject it, which would otherwise surface as a 500)."""
    for (messages, response), name in zip(pairs, fields, strict=True):
        texts = [(response, name), *((m.get("content"), _prompt_field(name)) for m in messages)]
        for text, field in texts:
            try:
                if isinstance(text, str):
                    text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise GPMError(
                    422,
                    "invalid_text",
                    f"{field}: text is not valid Unicode (a lone surrogate such as \\ud800 at "
                    f"position {exc.start})",
                    field=field,
                ) from None


def _prompt_field(field: str) -> str:
    """The prompt's field for a response's field (`groups.0.responses.2` → `groups.0.prompt`)."""
    if ".responses." in field:
        return field.split(".responses.")[0] + ".prompt"
    if field.startswith("pairs."):
        return field.rsplit(".", 1)[0] + ".prompt"
    return "prompt" if field in ("a", "b") else field


def _plain(prompt: Any) -> Any:
    """Schema prompt (str or ChatMessage models) → what `as_messages` takes."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def telemetry_batches(tensors: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Per-group tensors → `record()` keyword sets, one per group size G ≥ 2.

    Shapes: eigenvalues `[N, K]`, group_scores `[N, G, K]`, response_tokens `[N, G]` (int64).
    Groups of one response have no group score and are left out.
    """
    by_size: dict[int, list[dict[str, Any]]] = {}
    for t in tensors:
        g = len(t["response_tokens"])
        if g >= 2:
            by_size.setdefault(g, []).append(t)
    return [
        {
            "eigenvalues": torch.stack([t["eigenvalues"] for t in ts]),
            "group_scores": torch.stack([t["group_scores"] for t in ts]),
            "response_tokens": torch.tensor([t["response_tokens"] for t in ts], dtype=torch.int64),
        }
        for _, ts in sorted(by_size.items())
    ]
