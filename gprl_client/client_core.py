"""The I/O-free half of `GPMClient`: retry policy, errors, request payloads, typed results.

Kept apart from the httpx code so the sync and async clients share every decision (what to retry,
how long to wait, how a failed group looks) and tests can check them without a network.

Letters: N groups, G responses per group (the longest group; shorter ones are NaN-padded),
K axes, D = 2K, P pairs.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Transient statuses: the request may succeed later or on another replica (scoring is a pure
# function, so repeating it is safe).
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class GPMClientError(Exception):
    """Base class of every error the client raises."""


class GPMRequestError(GPMClientError):
    """The service rejected the request (a 4xx other than 429): retrying cannot help."""

    def __init__(self, status: int, code: str, message: str, url: str) -> None:
        super().__init__(f"{url} answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.url = url


class GPMUnavailableError(GPMClientError):
    """No URL could serve the request after all retries (or a non-retryable 5xx)."""

    def __init__(self, reason: str, attempts: int) -> None:
        super().__init__(f"gave up after {attempts} attempt(s): {reason}")
        self.reason = reason
        self.attempts = attempts


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to retry (attempt 0 is the first retry's wait).

    Without `Retry-After` the wait is "equal jitter" exponential backoff:
    `b/2 + U(0, b/2)` with `b = min(max_backoff, backoff · 2^attempt)`; the jitter keeps many
    learner processes from retrying in lockstep. A server's `Retry-After` r is a lower bound:
    the wait is `r + U(0, retry_after_jitter · r)` (capped at `max_retry_after`), so clients shed
    together by one 429 burst come back spread out instead of in one wave.
    """

    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 20.0
    max_retry_after: float = 60.0
    retry_after_jitter: float = 0.5

    def __post_init__(self) -> None:
        if min(self.max_retries, self.backoff, self.max_backoff, self.retry_after_jitter) < 0:
            raise ValueError("max_retries, backoff, max_backoff, retry_after_jitter must be >= 0")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            spread = rng.uniform(0.0, self.retry_after_jitter * retry_after)
            return min(retry_after + spread, self.max_retry_after)
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base / 2 + rng.uniform(0.0, base / 2)


def error_text(body: Any) -> tuple[str, str]:
    """`(code, message)` from the service's error body `{"error": {"code", "message"}}`."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        err = body["error"]
        return str(err.get("code", "error")), str(err.get("message", ""))
    if isinstance(body, Mapping) and "detail" in body:
        return "error", str(body["detail"])
    return "error", str(body)[:500]


# --- request payloads ------------------------------------------------------------------------

GroupLike = Mapping[str, Any] | Sequence[Any]


def normalize_group(group: GroupLike) -> dict[str, Any]:
    """`{"prompt", "responses", "id"?}` or `(prompt, responses)` → the /score group payload."""
    if isinstance(group, Mapping):
        out = {"prompt": group["prompt"], "responses": list(group["responses"])}
        if group.get("id") is not None:
            out["id"] = str(group["id"])
    else:
        prompt, responses = group
        out = {"prompt": prompt, "responses": list(responses)}
    if not out["responses"] or not all(isinstance(r, str) for r in out["responses"]):
        raise ValueError("every group needs a non-empty list of response strings")
    return out


def normalize_pair(pair: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """`{"prompt", "a", "b", "id"?}` or `(prompt, a, b)` → the /compare pair payload."""
    if isinstance(pair, Mapping):
        out = {"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"]}
        if pair.get("id") is not None:
            out["id"] = str(pair["id"])
        return out
    prompt, a, b = pair
    return {"prompt": prompt, "a": a, "b": b}


def idempotency_headers(body: Mapping[str, Any]) -> dict[str, str]:
    """One key per tagged request, made once and sent on every retry and every replica: a retried
    request whose first attempt reached a telemetry store (answer lost) is not counted twice, on
    that replica (it ignores a known key) or across replicas (`telemetry` merges by key)."""
    return {"Idempotency-Key": uuid.uuid4().hex} if body.get("run_id") is not None else {}


def telemetry_params(run_id: str, since_step: int) -> dict[str, Any]:
    """`GET /telemetry` query: `by_key` keeps keyed records apart so each counts once."""
    return {"run_id": run_id, "since_step": since_step, "by_key": "true"}


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# --- results -----------------------------------------------------------------------------------


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32)


def _floats(values: Sequence[Any]) -> torch.Tensor:
    """Nested lists of numbers/None → float32 tensor with None as NaN."""

    def conv(v: Any) -> Any:
        if v is None:
            return float("nan")
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return float(v)

    return torch.tensor(conv(list(values)), dtype=torch.float32)


@dataclass
class ScoreResult:
    """`/score` results as tensors, one row per input group, in input order.

    embeddings [N, G, 2K], eigenvalues [N, K], group_scores [N, G, K] (ŝ, without λ),
    rewards [N, G], matrix [N, G, G] or None, truncated [N, G] bool, response_tokens [N, G] int.
    valid [N, G]: a real, scored response (False for padding and failed groups).
    failed [N]: the group could not be scored; its rows are NaN and `errors[n]` says why.
    NaN also marks values that do not exist (ŝ of a one-response group): check `valid`/`failed`,
    never replace NaN by a number.
    """

    embeddings: torch.Tensor
    eigenvalues: torch.Tensor
    group_scores: torch.Tensor
    rewards: torch.Tensor
    truncated: torch.Tensor
    response_tokens: torch.Tensor
    valid: torch.Tensor
    failed: torch.Tensor
    errors: list[str | None]
    ids: list[str | None]
    matrix: torch.Tensor | None = None
    model: str | None = None
    k: int = 0
    tau: float = float("nan")
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def num_failed(self) -> int:
        return int(self.failed.sum())


def assemble_score(
    sizes: Sequence[int],
    ids: Sequence[str | None],
    parts: Sequence[tuple[range, Mapping[str, Any] | None, str | None]],
    k: int,
    return_matrix: bool,
) -> ScoreResult:
    """Build a `ScoreResult` from per-chunk answers: `(indices, response JSON or None, error)`."""
    n, g = len(sizes), max(sizes)
    res = ScoreResult(
        embeddings=_nan(n, g, 2 * k),
        eigenvalues=_nan(n, k),
        group_scores=_nan(n, g, k),
        rewards=_nan(n, g),
        truncated=torch.zeros(n, g, dtype=torch.bool),
        response_tokens=torch.zeros(n, g, dtype=torch.long),
        valid=torch.zeros(n, g, dtype=torch.bool),
        failed=torch.zeros(n, dtype=torch.bool),
        errors=[None] * n,
        ids=list(ids),
        matrix=_nan(n, g, g) if return_matrix else None,
        k=k,
    )
    usage: dict[str, int] = {}
    for indices, body, error in parts:
        if body is None:
            for i in indices:
                res.failed[i] = True
                res.errors[i] = error
            continue
        res.model, res.tau = body.get("model"), float(body.get("tau", float("nan")))
        for key, value in (body.get("usage") or {}).items():
            usage[key] = usage.get(key, 0) + int(value)
        for i, grp in zip(indices, body["groups"], strict=True):
            _fill_group(res, i, sizes[i], grp)
    res.usage = usage
    return res


def _fill_group(res: ScoreResult, i: int, size: int, grp: Mapping[str, Any]) -> None:
    emb = _floats(grp["embeddings"])
    if emb.shape != (size, 2 * res.k):
        raise GPMClientError(
            f"group {i}: embeddings {tuple(emb.shape)}, expected {(size, 2 * res.k)}"
        )
    res.embeddings[i, :size] = emb
    res.eigenvalues[i] = _floats(grp["eigenvalues"])
    res.group_scores[i, :size] = _floats(grp["group_scores"])
    res.rewards[i, :size] = _floats(grp["rewards"])
    res.truncated[i, :size] = torch.tensor(grp.get("truncated") or [False] * size)
    if grp.get("response_tokens") is not None:
        res.response_tokens[i, :size] = torch.tensor(grp["response_tokens"], dtype=torch.long)
    res.valid[i, :size] = torch.isfinite(emb).all(dim=-1)
    if res.matrix is not None and grp.get("matrix") is not None:
        res.matrix[i, :size, :size] = _floats(grp["matrix"])


@dataclass
class CompareResult:
    """`/compare` results, one row per pair: prob_a_wins [P], score [P], per_dimension [P, K],
    eigenvalues [P, K], truncated [P, 2]; `failed` [P] rows are NaN with `errors[p]`."""

    prob_a_wins: torch.Tensor
    score: torch.Tensor
    per_dimension: torch.Tensor
    eigenvalues: torch.Tensor
    truncated: torch.Tensor
    failed: torch.Tensor
    errors: list[str | None]
    model: str | None = None
    k: int = 0


def assemble_compare(
    n: int, parts: Sequence[tuple[range, Mapping[str, Any] | None, str | None]], k: int
) -> CompareResult:
    res = CompareResult(
        prob_a_wins=_nan(n),
        score=_nan(n),
        per_dimension=_nan(n, k),
        eigenvalues=_nan(n, k),
        truncated=torch.zeros(n, 2, dtype=torch.bool),
        failed=torch.zeros(n, dtype=torch.bool),
        errors=[None] * n,
        k=k,
    )
    for indices, body, error in parts:
        if body is None:
            for i in indices:
                res.failed[i], res.errors[i] = True, error
            continue
        res.model = body.get("model")
        for i, item in zip(indices, body["results"], strict=True):
            res.prob_a_wins[i] = float(item["prob_a_wins"])
            res.score[i] = float(item["score"])
            res.per_dimension[i] = _floats(item["per_dimension"])
            res.eigenvalues[i] = _floats(item["eigenvalues"])
            res.truncated[i] = torch.tensor(item.get("truncated") or [False, False])
    return res
