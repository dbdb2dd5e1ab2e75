"""Bounded-concurrency async load generator (httpx) and Prometheus histogram deltas.

`run_load` keeps exactly `concurrency` requests in flight (closed loop: C workers, each sends
its next request as soon as the previous one is answered) until `len(payloads)` requests are
done, and records each request's latency. Throughput = completed responses / wall time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation between order statistics."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class LoadResult:
    """One load level. Latencies in seconds; `errors` counts non-200 answers and exceptions."""

    concurrency: int
    requests: int
    responses: int
    tokens: int
    errors: int
    wall_s: float
    responses_per_s: float
    tokens_per_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    peak_rss_mb: float | None = None
    server: dict[str, Any] | None = None  # batch/padding statistics from /metrics
    error_kinds: dict[str, int] | None = None  # status code (or exception name) → count

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _run(
    url: str,
    payloads: Sequence[dict[str, Any]],
    concurrency: int,
    timeout_s: float,
) -> tuple[list[float], dict[str, int], float]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(payloads):
                body = payloads[next_index]
                next_index += 1
                started = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    kind = str(r.status_code)
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                if kind == "200":
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[kind] = errors.get(kind, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, errors, wall


def run_load(
    url: str,
    payloads: Sequence[dict[str, Any]],
    concurrency: int,
    responses_per_request: int,
    tokens_per_request: Sequence[int],
    timeout_s: float = 600.0,
) -> LoadResult:
    """Send `payloads` to `url` (POST JSON) with `concurrency` in flight; summarise."""
    lat, errors, wall = asyncio.run(_run(url, payloads, concurrency, timeout_s))
    ok = len(lat)
    responses = ok * responses_per_request
    tokens = round(sum(tokens_per_request) * ok / max(1, len(payloads)))
    return LoadResult(
        concurrency=concurrency,
        requests=len(payloads),
        responses=responses,
        tokens=tokens,
        errors=sum(errors.values()),
        wall_s=wall,
        responses_per_s=responses / wall,
        tokens_per_s=tokens / wall,
        p50_s=percentile(lat, 50),
        p90_s=percentile(lat, 90),
        p99_s=percentile(lat, 99),
        max_s=max(lat, default=math.nan),
        error_kinds=errors,
    )


# --- /metrics ----------------------------------------------------------------------------------


def scrape(base_url: str) -> dict[str, float]:
    """`GET /metrics` → `{sample name with labels: value}` (empty when there is no /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(f"{base_url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    text = r.text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batch-size and padding statistics of the forward passes between two scrapes."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = delta("gpm_batch_size_count{}")
    if batches <= 0:
        return {}
    padded = delta("gpm_batch_tokens_sum{kind=padded}")
    real = delta("gpm_batch_tokens_sum{kind=real}")
    hist = {}
    prev = 0.0
    for key in sorted(
        (k for k in after if k.startswith("gpm_batch_size_bucket{")),
        key=lambda k: float(k.split("le=")[1].rstrip("}")),
    ):
        cum = delta(key)
        le = key.split("le=")[1].rstrip("}")
        if cum - prev > 0:
            hist[le] = cum - prev
        prev = cum
    return {
        "batches": batches,
        "mean_batch_size": delta("gpm_batch_size_sum{}") / batches,
        "batch_size_histogram": hist,  # upper bucket bound → number of batches
        "padded_tokens": padded,
        "real_tokens": real,
        "padding_fraction": 1.0 - real / padded if padded else 0.0,
        "mean_forward_s": delta("gpm_stage_seconds_sum{stage=forward}")
        / max(1.0, delta("gpm_stage_seconds_count{stage=forward}")),
        "mean_queue_s": delta("gpm_stage_seconds_sum{stage=queue}")
        / max(1.0, delta("gpm_stage_seconds_count{stage=queue}")),
    }
