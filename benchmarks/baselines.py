"""In-process baselines on pre-encoded sequences: no HTTP, no tokenisation.

- `raw_forward`: sequences/s of `GPM.forward` over consecutive chunks of the given sequences
  (arrival order, as a server would see them) at several batch sizes; the best is *the limit*.
  With sharing off this is the plain Hugging Face batched forward plus the (tiny) heads.
- `dtype_error`: bf16 against fp32 on the same sequences: max abs error of the embeddings, the
  eigenvalues and the in-group preference probabilities P(i ≻ j).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from gpm_server.model import GPM
from gpm_server.protocol import EncodedSequence
from gprl_client import gpm_math


def _time_chunks(
    model: GPM, seqs: Sequence[EncodedSequence], bs: int, budget_s: float
) -> dict[str, Any]:
    """Forward consecutive chunks of `bs` until `budget_s` is spent (at least one chunk)."""
    chunks = [seqs[i : i + bs] for i in range(0, len(seqs), bs)]
    done, tokens, times = 0, 0, []
    started = time.perf_counter()
    for i in range(len(chunks)):
        chunk = chunks[(i + 1) % len(chunks)]
        t0 = time.perf_counter()
        model.forward(chunk)
        times.append(time.perf_counter() - t0)
        done += len(chunk)
        tokens += sum(s.cost for s in chunk)
        if time.perf_counter() - started > budget_s:
            break
    total = sum(times)
    return {
        "batch_size": bs,
        "sequences": done,
        "seconds": total,
        "sequences_per_s": done / total,
        "tokens_per_s": tokens / total,
        "median_batch_s": statistics.median(times),
    }


def raw_forward(
    model: GPM,
    seqs: Sequence[EncodedSequence],
    batch_sizes: Sequence[int],
    budget_s: float,
    sharing: bool = False,
) -> dict[str, Any]:
    """Throughput per batch size and the best one (`sharing`: prefix sharing on or off)."""
    old = model.prefix_sharing
    model.prefix_sharing = sharing
    try:
        model.forward(seqs[:1])  # warm-up (allocator, threads), not timed
        runs = [_time_chunks(model, seqs, bs, budget_s) for bs in batch_sizes if bs <= len(seqs)]
    finally:
        model.prefix_sharing = old
    best = max(runs, key=lambda r: r["sequences_per_s"])
    return {"sharing": sharing, "runs": runs, "best": best}


def single_forward_s(model: GPM, seqs: Sequence[EncodedSequence], n: int) -> float:
    """Median seconds of one batch-1 forward pass over the first `n` sequences."""
    model.forward(seqs[:1])
    times = []
    for s in seqs[:n]:
        t0 = time.perf_counter()
        model.forward([s])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dtype_error(
    ref: GPM, other: GPM, seqs: Sequence[EncodedSequence], g: int, tau: float
) -> dict[str, float]:
    """Max abs differences `other − ref` on `seqs` (N whole groups of `g`, in order), and the
    sequences/s of each model on this one batch."""
    ref.forward(seqs[:1]), other.forward(seqs[:1])  # warm-up
    t0 = time.perf_counter()
    a = ref.forward(seqs)
    t1 = time.perf_counter()
    b = other.forward(seqs)
    t2 = time.perf_counter()
    n = len(seqs) // g
    pa = gpm_math.preference_matrix(
        a.embeddings[: n * g].view(n, g, -1), a.eigenvalues[: n * g : g], tau
    )
    pb = gpm_math.preference_matrix(
        b.embeddings[: n * g].view(n, g, -1), b.eigenvalues[: n * g : g], tau
    )
    return {
        "sequences": len(seqs),
        "max_abs_embedding": float((a.embeddings - b.embeddings).abs().max()),
        "max_abs_eigenvalue": float((a.eigenvalues - b.eigenvalues).abs().max()),
        "max_abs_preference_probability": float((pa - pb).abs().max()),
        "mean_abs_preference_probability": float((pa - pb).abs().mean()),
        "ref_sequences_per_s": len(seqs) / (t1 - t0),
        "other_sequences_per_s": len(seqs) / (t2 - t1),
    }


def sharing_savings(model: GPM, seqs: Sequence[EncodedSequence], bs: int) -> dict[str, float]:
    """Padded tokens computed per sequence with and without sharing, at batch size `bs`."""
    from gpm_server.prefix_sharing import plan_sharing

    plain = shared = 0
    for i in range(0, len(seqs), bs):
        chunk = seqs[i : i + bs]
        cost = len(chunk) * max(s.cost for s in chunk)
        plan = plan_sharing(chunk, *model.share_thresholds)
        plain += cost
        shared += cost if plan is None else plan.padded_tokens()
    return {"padded_tokens_plain": plain, "padded_tokens_shared": shared, "ratio": plain / shared}
