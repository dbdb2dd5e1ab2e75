"""The tiny interface between the service (batcher, routes) and a GPM backend.

The batcher and the HTTP layer only see this; tests plug in a fake backend without
monkeypatching. The real implementation is `gpm_server.model.GPM`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

Message = dict[str, str]


def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    """A plain-text prompt is one user turn; chat messages pass through (copied)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


@dataclass(frozen=True)
class EncodedSequence:
    """One tokenised `(prompt, response)` sequence, ready for the forward pass.

    `input_ids` is right-truncated with its last id overwritten by EOS (gprl-math.md §1);
    `prompt_len` is P, the templated prompt's token count (the gate reads position P − 1),
    clipped to `len(input_ids)`; `prompt_key` identifies the templated prompt so the gate is
    computed once per distinct prompt; `response_tokens` counts tokens after the prompt;
    `full_response_tokens` counts them before truncation (the optional length head reads it).
    """

    input_ids: tuple[int, ...]
    prompt_len: int
    prompt_key: str
    truncated: bool
    response_tokens: int = 0
    full_response_tokens: int = 0

    @property
    def cost(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    k: int
    tau: float
    gated: bool
    l2_normalize: bool
    max_length: int
    dtype: str
    device: str
    revision: str | None = None
    source_format: str = "gprl"  # "gprl" (ours) or "released" (CustomRewardModel)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchOutput:
    """Outputs for B sequences: embeddings `[B, 2K]` and eigenvalues `[B, K]` (float32, CPU)."""

    embeddings: torch.Tensor
    eigenvalues: torch.Tensor


@runtime_checkable
class GPMBackend(Protocol):
    info: ModelInfo

    def encode(self, pairs: Sequence[tuple[Sequence[Message], str]]) -> list[EncodedSequence]:
        """Tokenise `(prompt_messages, response)` pairs (batched, fast tokenizer)."""
        ...

    def forward(self, seqs: Sequence[EncodedSequence]) -> BatchOutput:
        """One padded forward pass over `seqs`; blocking, called from a worker thread."""
        ...
