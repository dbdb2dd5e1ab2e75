"""A deterministic fake `GPMBackend` for batcher and API tests (no transformers, no weights).

Token ids are character codes, so lengths are predictable: the templated prompt is
`"<role>content"` per message, the full sequence is prompt + response + one EOS. A sequence's
embedding depends only on its own ids (batch invariance holds by construction) and the
eigenvalues only on the prompt. Knobs: `delay_s` per forward, `gate` (clear it to hold every
forward until set), `fail_marker` (a response containing it makes any batch holding it raise),
`max_ok_batch` (bigger batches raise, like an out-of-memory error).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence

import torch

from gpm_server.protocol import BatchOutput, EncodedSequence, Message, ModelInfo, as_messages

EOS = 2


def _ids(text: str) -> list[int]:
    return [3 + ord(c) % 251 for c in text]


def _seeded(key: bytes, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(key))
    return torch.randn(n, generator=gen)


class FakeBackend:
    def __init__(
        self,
        k: int = 2,
        tau: float = 0.1,
        max_length: int = 256,
        gated: bool = True,
        delay_s: float = 0.0,
        fail_marker: str | None = None,
        max_ok_batch: int | None = None,
    ) -> None:
        self.info = ModelInfo(
            model_id="fake-gpm",
            k=k,
            tau=tau,
            gated=gated,
            l2_normalize=True,
            max_length=max_length,
            dtype="float32",
            device="cpu",
        )
        self.delay_s = delay_s
        self.fail_marker = fail_marker
        self.max_ok_batch = max_ok_batch
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[EncodedSequence]] = []  # every forward call, failed ones too
        self.entered = threading.Event()  # set when a forward starts (tests wait on it)
        self.threads: set[int] = set()  # threads that ran forward (never the event loop's)
        self._poison: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def encode(self, pairs: Sequence[tuple[Sequence[Message] | str, str]]) -> list[EncodedSequence]:
        out = []
        for prompt, response in pairs:
            text = "".join(f"<{m['role']}>{m['content']}" for m in as_messages(prompt))
            prompt_ids = _ids(text)
            ids = [*prompt_ids, *_ids(response), EOS]
            truncated = len(ids) > self.info.max_length
            ids = ids[: self.info.max_length]
            ids[-1] = EOS
            p = min(len(prompt_ids), len(ids))
            seq = EncodedSequence(tuple(ids), p, text, truncated, len(ids) - p)
            if self.fail_marker is not None and self.fail_marker in response:
                with self._lock:
                    self._poison.add(seq.input_ids)
            out.append(seq)
        return out

    def embedding(self, seq: EncodedSequence) -> torch.Tensor:
        """The embedding `[2K]` of one sequence (L2-normalised)."""
        v = _seeded(bytes(str(seq.input_ids), "utf8"), 2 * self.info.k)
        return v / v.norm()

    def eigenvalues(self, seq: EncodedSequence) -> torch.Tensor:
        """λ `[K]` for the sequence's prompt (softmax; ones when ungated)."""
        if not self.info.gated:
            return torch.ones(self.info.k)
        return torch.softmax(_seeded(seq.prompt_key.encode(), self.info.k), dim=0)

    def forward(self, seqs: Sequence[EncodedSequence]) -> BatchOutput:
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.gate.wait(timeout=30)
        with self._lock:
            self.batches.append(list(seqs))
            poisoned = any(s.input_ids in self._poison for s in seqs)
        if self.delay_s:
            time.sleep(self.delay_s)
        if poisoned:
            raise RuntimeError("fake model failure")
        if self.max_ok_batch is not None and len(seqs) > self.max_ok_batch:
            raise RuntimeError("fake out of memory")
        return BatchOutput(
            torch.stack([self.embedding(s) for s in seqs]),
            torch.stack([self.eigenvalues(s) for s in seqs]),
        )
