"""Bounded-concurrency async load generator (raw keep-alive HTTP/1.1) and /metrics deltas.

`run_load` keeps exactly `concurrency` requests in flight (closed loop: C workers, each sends
its next request as soon as the previous one is answered) until `len(payloads)` requests are
done, and records each request's latency. Throughput = completed responses / wall time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

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


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs pre-serialised JSON bodies.

    A load generator must cost less than the servers it measures. httpx's pool spends about a
    millisecond of CPU per request at high concurrency and more when many answers arrive at
    once (a batching server's pattern); on a 2-core machine that shared the CPU with the server
    and throttled batching servers most. This client writes one request and reads one answer
    (`Content-Length` or chunked) per call, and reconnects when the server closes.

    Servers close idle keep-alive connections (uvicorn after 5 s), and a request written just
    as that happens finds the connection gone before any answer: a connection idle for over
    `max_idle_s` is replaced before use, and a reused one that fails before the first answer
    byte is retried once on a fresh connection (the server never read that request).
    """

    def __init__(self, host: str, port: int, path: str, max_idle_s: float = 2.0) -> None:
        self.host, self.port, self.path = host, port, path
        self.max_idle_s = max_idle_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0
        self.opened = 0  # connections opened so far (tests)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._writer is not None and time.monotonic() - self._last_used > self.max_idle_s:
            self.close()
        reused = self._writer is not None
        try:
            return await self._exchange(body)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            answered = isinstance(exc, asyncio.IncompleteReadError) and bool(exc.partial)
            if not reused or answered:
                raise
            return await self._exchange(body)

    async def _exchange(self, body: bytes) -> tuple[int, bytes]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            self._writer.write(head.encode() + body)
            await self._writer.drain()
            status, headers = _parse_head(await self._reader.readuntil(b"\r\n\r\n"))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                payload = await _read_chunked(self._reader)
            else:
                payload = await self._reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        self._last_used = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from our servers
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError)


def split_url(url: str) -> tuple[str, int, str]:
    """`http://host:port/path?query` → `(host, port, "/path?query")` (plain http only)."""
    target = urlsplit(url)
    if target.scheme != "http" or target.hostname is None:
        raise ValueError(f"the load generator speaks plain http:// only, got {url!r}")
    path = (target.path or "/") + (f"?{target.query}" if target.query else "")
    return target.hostname, target.port or 80, path


async def _run(
    url: str,
    payloads: Sequence[dict[str, Any]],
    concurrency: int,
    timeout_s: float,
) -> tuple[list[float], dict[str, int], float]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    host, port, path = split_url(url)
    bodies = [json.dumps(p).encode() for p in payloads]  # serialised before the clock starts
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        conn = Connection(host, port, path)
        try:
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                started = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(conn.post(body), timeout_s)
                    kind = str(status)
                except TRANSPORT_ERRORS as exc:
                    kind = type(exc).__name__
                if kind == "200":
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[kind] = errors.get(kind, 0) + 1
        finally:
            conn.close()

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
