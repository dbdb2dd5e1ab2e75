"""`GPMClient` / `AsyncGPMClient`: the learner's HTTP client for the GPM verifier service.

- One long-lived httpx connection pool per client (close it, or use `with` / `async with`).
- Several base URLs: each call starts at the next URL (round robin) and every retry moves on to
  the next one, so a dead replica costs one failed attempt, not a failed step.
- Retries with exponential backoff and jitter on connection errors, timeouts and 429/502/503/504,
  honouring `Retry-After`; other 4xx raise `GPMRequestError` at once (retrying cannot help).
- `score` sends groups in chunks; a chunk that cannot be scored after all retries (or that gets
  a 5xx) comes back as NaN rows with `failed=True` and a reason, is counted in `failures` and
  logged at WARNING; it is never turned into a number. `raise_on_failure=True` raises instead.
- `telemetry(run_id)` asks every URL and merges the answers exactly (a replica that does not
  answer raises: partial telemetry would silently bias the drift monitor). Tagged `score` calls
  carry one `Idempotency-Key` per request, the same on every retry and every replica, and the
  merge counts each key once, so a retry that failed over after the first replica stored the
  record (and died before answering) is not counted twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from gprl_client.client_core import (
    RETRY_STATUSES,
    CompareResult,
    GPMClientError,
    GPMRequestError,
    GPMUnavailableError,
    GroupLike,
    RetryPolicy,
    ScoreResult,
    assemble_compare,
    assemble_score,
    chunks,
    error_text,
    idempotency_headers,
    normalize_group,
    normalize_pair,
    parse_retry_after,
    telemetry_params,
)
from gprl_core.telemetry import RunTelemetry, merge_by_key

log = logging.getLogger("gprl_client.client")

# Transport failures worth retrying (the request may not have reached a healthy server).
RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

__all__ = [
    "AsyncGPMClient",
    "CompareResult",
    "GPMClient",
    "GPMClientError",
    "GPMRequestError",
    "GPMUnavailableError",
    "RetryPolicy",
    "ScoreResult",
]


class _Base:
    """Configuration and every decision shared by the sync and async clients.

    base_urls: one URL or several replicas; api_key: sent as `Authorization: Bearer`;
    timeout / connect_timeout: seconds per attempt; max_retries: extra attempts after the first;
    backoff / max_backoff: seconds, see `RetryPolicy`; max_groups_per_request: chunk size of
    `score` and `compare`; raise_on_failure: raise `GPMUnavailableError` instead of returning
    NaN rows; k: K, so that a call where nothing could be scored still returns NaN rows of the
    right shape (otherwise learned from the first answer); seed: the jitter's RNG seed.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        max_groups_per_request: int = 32,
        raise_on_failure: bool = False,
        k: int | None = None,
        seed: int | None = None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("need at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.policy = RetryPolicy(max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        self.max_groups_per_request = max_groups_per_request
        self.raise_on_failure = raise_on_failure
        self.failures = 0  # groups/pairs that could not be scored (NaN rows handed out)
        self.retries = 0  # attempts repeated after a transient failure
        self._k = k  # K, learned from the first answer; lets an all-failed call build NaN rows
        self._rng = random.Random(seed)
        self._rr = itertools.count()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)

    def _urls_for_call(self, only: str | None) -> list[str]:
        """The URL of each attempt: start at the next URL (round robin), move on after a failure."""
        if only is not None:
            return [only] * (self.policy.max_retries + 1)
        start = next(self._rr)
        n = len(self.base_urls)
        return [self.base_urls[(start + a) % n] for a in range(self.policy.max_retries + 1)]

    def _outcome(
        self, url: str, resp: httpx.Response | None, exc: Exception | None
    ) -> tuple[str, float | None]:
        """`(reason, retry_after)` for a retryable failure; raises for a final one."""
        if exc is not None:
            return f"{url}: {type(exc).__name__}: {exc}", None
        assert resp is not None
        try:
            code, message = error_text(resp.json())
        except ValueError:
            code, message = "error", resp.text[:500]
        if resp.status_code in RETRY_STATUSES:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return f"{url}: HTTP {resp.status_code} {code}: {message}", retry_after
        if resp.status_code < 500:
            raise GPMRequestError(resp.status_code, code, message, url)
        raise GPMUnavailableError(f"{url}: HTTP {resp.status_code} {code}: {message}", 1)

    def _next_delay(self, attempt: int, reason: str, retry_after: float | None) -> float:
        delay = self.policy.delay(attempt, retry_after, self._rng)
        self.retries += 1
        log.info("GPM request failed (%s); retry %d in %.2fs", reason, attempt + 1, delay)
        return delay

    def _score_payloads(
        self, groups: Sequence[GroupLike], run_id: str | None, step: int | None, matrix: bool
    ) -> tuple[list[dict[str, Any]], list[range], list[dict[str, Any]]]:
        if (run_id is None) != (step is None):
            raise ValueError("run_id and step must be given together")
        items = [normalize_group(g) for g in groups]
        if not items:
            raise ValueError("score() needs at least one group")
        parts = chunks(len(items), self.max_groups_per_request)
        payloads = []
        for idx in parts:
            body: dict[str, Any] = {"groups": [items[i] for i in idx], "return_matrix": matrix}
            if run_id is not None:
                body.update(run_id=run_id, step=step)
            payloads.append(body)
        return items, parts, payloads

    def _learn_k(self, answers: Sequence[Mapping[str, Any] | None]) -> int:
        for body in answers:
            if body is not None:
                self._k = int(body["k"])
        if self._k is None:
            raise GPMUnavailableError(
                "nothing could be scored and K is unknown (pass k= to the client to get NaN "
                "rows instead)",
                0,
            )
        return self._k

    def _report(self, what: str, parts: Sequence[tuple[range, Any, str | None]]) -> None:
        """Count, log and (if asked) raise for the chunks that failed."""
        for idx, body, reason in parts:
            if body is None:
                self.failures += len(idx)
                log.warning(
                    "GPM %s: %d item(s) [%d..%d] could not be scored, returned as NaN: %s",
                    what, len(idx), idx.start, idx.stop - 1, reason,
                )  # fmt: skip
        if self.raise_on_failure:
            for idx, body, reason in parts:
                if body is None:
                    raise GPMUnavailableError(
                        f"{what} items {idx.start}..{idx.stop - 1}: {reason}",
                        self.policy.max_retries + 1,
                    )

    def _finish_score(
        self,
        items: list[dict[str, Any]],
        parts: list[range],
        answers: Sequence[tuple[dict | None, str | None]],
        matrix: bool,
    ) -> ScoreResult:
        triples = [(idx, body, err) for idx, (body, err) in zip(parts, answers, strict=True)]
        self._report("score", triples)
        k = self._learn_k([b for b, _ in answers])
        sizes = [len(it["responses"]) for it in items]
        return assemble_score(sizes, [it.get("id") for it in items], triples, k, matrix)

    def _finish_compare(
        self, n: int, parts: list[range], answers: Sequence[tuple[dict | None, str | None]]
    ) -> CompareResult:
        triples = [(idx, body, err) for idx, (body, err) in zip(parts, answers, strict=True)]
        self._report("compare", triples)
        return assemble_compare(n, triples, self._learn_k([b for b, _ in answers]))


class GPMClient(_Base):
    """Synchronous client. See the module docstring; `AsyncGPMClient` has the same methods."""

    def __init__(self, base_urls: str | Sequence[str], **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(base_urls, **kwargs)
        self._sleep = time.sleep  # tests replace it to record delays without waiting
        self._http = httpx.Client(headers=self._headers, timeout=self._timeout, transport=transport)

    def _request(
        self, method: str, path: str, *, only: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        reason = "no attempt made"
        for attempt, url in enumerate(self._urls_for_call(only)):
            resp, exc = None, None
            try:
                resp = self._http.request(method, url + path, **kwargs)
                if resp.status_code < 400:
                    return resp
            except RETRY_EXCEPTIONS as e:
                exc = e
            reason, retry_after = self._outcome(url, resp, exc)
            if attempt < self.policy.max_retries:
                self._sleep(self._next_delay(attempt, reason, retry_after))
        raise GPMUnavailableError(reason, self.policy.max_retries + 1)

    def _post_chunk(self, path: str, body: dict[str, Any]) -> tuple[dict | None, str | None]:
        try:
            headers = idempotency_headers(body)
            return self._request("POST", path, json=body, headers=headers).json(), None
        except GPMUnavailableError as e:
            return None, e.reason

    def score(
        self,
        groups: Sequence[GroupLike],
        run_id: str | None = None,
        step: int | None = None,
        return_matrix: bool = False,
    ) -> ScoreResult:
        """Score groups `[{"prompt", "responses", "id"?}]` or `[(prompt, responses)]` → tensors."""
        items, parts, payloads = self._score_payloads(groups, run_id, step, return_matrix)
        answers = [self._post_chunk("/score", body) for body in payloads]
        return self._finish_score(items, parts, answers, return_matrix)

    def compare(self, pairs: Sequence[Any]) -> CompareResult:
        """`P(a ≻ b)` for pairs `[{"prompt", "a", "b"}]` or `[(prompt, a, b)]`."""
        items = [normalize_pair(p) for p in pairs]
        parts = chunks(len(items), self.max_groups_per_request)
        answers = [
            self._post_chunk("/compare", {"pairs": [items[i] for i in idx]}) for idx in parts
        ]
        return self._finish_compare(len(items), parts, answers)

    def info(self) -> dict[str, Any]:
        """`GET /info` from the first URL that answers."""
        info = self._request("GET", "/info").json()
        self._k = int(info["k"])
        return info

    def telemetry(self, run_id: str, since_step: int = 0) -> RunTelemetry:
        """Telemetry of `run_id` (steps >= since_step) from every URL, merged exactly: each
        keyed record counts once, however many replicas stored it."""
        params = telemetry_params(run_id, since_step)
        return merge_by_key(
            self._request("GET", "/telemetry", only=u, params=params).json() for u in self.base_urls
        )

    def wait_ready(
        self, timeout: float = 120.0, interval: float = 0.5, all_urls: bool = False
    ) -> list[str]:
        """Poll `/ready` until one URL (or every URL) is ready; returns the ready URLs."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [u for u in self.base_urls if self._is_ready(u)]
            if ready and (not all_urls or len(ready) == len(self.base_urls)):
                return ready
            if time.monotonic() >= deadline:
                raise TimeoutError(f"GPM service not ready after {timeout}s: {self.base_urls}")
            time.sleep(interval)

    def _is_ready(self, url: str) -> bool:
        try:
            return self._http.get(url + "/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GPMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGPMClient(_Base):
    """asyncio client; chunks of one `score` call run concurrently (at most `max_concurrency`)."""

    def __init__(
        self, base_urls: str | Sequence[str], *, max_concurrency: int = 8, **kwargs: Any
    ) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(base_urls, **kwargs)
        self._sleep = asyncio.sleep
        self._sem = asyncio.Semaphore(max_concurrency)
        self._http = httpx.AsyncClient(
            headers=self._headers, timeout=self._timeout, transport=transport
        )

    async def _request(
        self, method: str, path: str, *, only: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        reason = "no attempt made"
        for attempt, url in enumerate(self._urls_for_call(only)):
            resp, exc = None, None
            try:
                resp = await self._http.request(method, url + path, **kwargs)
                if resp.status_code < 400:
                    return resp
            except RETRY_EXCEPTIONS as e:
                exc = e
            reason, retry_after = self._outcome(url, resp, exc)
            if attempt < self.policy.max_retries:
                await self._sleep(self._next_delay(attempt, reason, retry_after))
        raise GPMUnavailableError(reason, self.policy.max_retries + 1)

    async def _post_chunk(self, path: str, body: dict[str, Any]) -> tuple[dict | None, str | None]:
        async with self._sem:
            try:
                headers = idempotency_headers(body)
                resp = await self._request("POST", path, json=body, headers=headers)
                return resp.json(), None
            except GPMUnavailableError as e:
                return None, e.reason

    async def score(
        self,
        groups: Sequence[GroupLike],
        run_id: str | None = None,
        step: int | None = None,
        return_matrix: bool = False,
    ) -> ScoreResult:
        items, parts, payloads = self._score_payloads(groups, run_id, step, return_matrix)
        answers = await asyncio.gather(*(self._post_chunk("/score", b) for b in payloads))
        return self._finish_score(items, parts, answers, return_matrix)

    async def compare(self, pairs: Sequence[Any]) -> CompareResult:
        items = [normalize_pair(p) for p in pairs]
        parts = chunks(len(items), self.max_groups_per_request)
        answers = await asyncio.gather(
            *(self._post_chunk("/compare", {"pairs": [items[i] for i in idx]}) for idx in parts)
        )
        return self._finish_compare(len(items), parts, answers)

    async def info(self) -> dict[str, Any]:
        info = (await self._request("GET", "/info")).json()
        self._k = int(info["k"])
        return info

    async def telemetry(self, run_id: str, since_step: int = 0) -> RunTelemetry:
        params = telemetry_params(run_id, since_step)
        answers = await asyncio.gather(
            *(self._request("GET", "/telemetry", only=u, params=params) for u in self.base_urls)
        )
        return merge_by_key(r.json() for r in answers)

    async def wait_ready(
        self, timeout: float = 120.0, interval: float = 0.5, all_urls: bool = False
    ) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            flags = await asyncio.gather(*(self._is_ready(u) for u in self.base_urls))
            ready = [u for u, ok in zip(self.base_urls, flags, strict=True) if ok]
            if ready and (not all_urls or len(ready) == len(self.base_urls)):
                return ready
            if time.monotonic() >= deadline:
                raise TimeoutError(f"GPM service not ready after {timeout}s: {self.base_urls}")
            await asyncio.sleep(interval)

    async def _is_ready(self, url: str) -> bool:
        try:
            return (await self._http.get(url + "/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncGPMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
