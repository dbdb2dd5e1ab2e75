"""The soak run's load and its measurements (benchmarks/soak.py runs the phases): request
groups, the open-loop load and its summary, the sustainable-rate rule and the step-up, the
server sampler (RSS, queue depth), the burst through `AsyncGPMClient` and its re-check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from benchmarks.loadgen import TRANSPORT_ERRORS, Connection, percentile, scrape, split_url

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "why",
    "is",
    "sky",
    "blue",
    "explain",
    "in",
    "one",
    "short",
    "paragraph",
    "books",
    "remain",
    "crucial",
    "digital",
    "era",
    "depth",
    "critical",
    "thinking",
    "write",
    "haiku",
    "about",
    "sea",
    "waves",
    "foam",
    "salt",
    "wind",
    "gull",
    "voices",
    "what",
    "two",
    "plus",
    "four",
    "answer",
    "numbers",
    "digits",
    "hello",
    "thanks",
    "please",
    "yes",
    "no",
]


@dataclass
class Config:
    model: str = "tiny"
    duration_s: float = 600.0
    step_s: float = 20.0
    start_rate: float = 4.0
    max_rate: float = 2000.0
    rate_factor: float = 1.5
    hold_margin_steps: int = 1  # hold this many sustainable steps below the last one
    p99_limit_s: float = 1.0
    burst_factor: float = 10.0
    burst_s: float = 2.0
    recover_s: float = 30.0
    window_s: float = 10.0
    group_size: int = 4
    max_queue: int = 256
    max_in_flight: int = 64
    max_wait_ms: float = 5.0
    threads: int = 1  # the server's OMP/MKL threads (see docs/reliability.md)
    seed: int = 0
    out: str = "soak"  # file stem under benchmarks/results/


@dataclass
class Record:
    sent: float  # seconds since the phase started
    latency: float
    status: int  # HTTP status; 0 for a transport error or a request the client could not send


def make_groups(n: int, g: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` groups of `g` responses of 3–30 random words (a distinct prompt per group)."""

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(4, 20), "responses": [text(3, 30) for _ in range(g)]} for _ in range(n)]


# --- open-loop load ----------------------------------------------------------------------------


async def open_loop(
    url: str, rate: float, duration_s: float, groups: list[dict], max_in_flight: int = 2000
) -> list[Record]:
    """Send `/score` requests at `rate`/s for `duration_s` (open loop); one `Record` each.

    Keep-alive connections of the raw client in `benchmarks.loadgen` (a new one when none is
    idle), bodies serialised up front: the client must cost little next to the server.
    """
    records: list[Record] = []
    host, port, path = split_url(url.rstrip("/") + "/score")
    bodies = [json.dumps({"groups": [g]}).encode() for g in groups]
    idle: list[Connection] = []
    start = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, sent: float) -> None:
        conn = idle.pop() if idle else Connection(host, port, path)
        status = 0
        try:
            status, _ = await asyncio.wait_for(conn.post(bodies[i % len(bodies)]), 60.0)
            idle.append(conn)
        except TRANSPORT_ERRORS:
            conn.close()
        records.append(Record(sent, time.perf_counter() - start - sent, status))

    n = int(rate * duration_s)
    for i in range(n):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sent = time.perf_counter() - start
        if len(tasks) >= max_in_flight:  # the client itself is overloaded: count it
            records.append(Record(sent, 0.0, 0))
            continue
        task = asyncio.create_task(one(i, sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return records


def summarize(records: list[Record], rate: float, duration_s: float) -> dict[str, Any]:
    """Counts, achieved rate and latency percentiles (seconds) of successful requests."""
    ok = [r.latency for r in records if r.status == 200]
    by_status: dict[str, int] = {}
    for r in records:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    in_time = sum(1 for r in records if r.status == 200 and r.sent + r.latency <= duration_s + 1)
    return {
        "rate": rate,
        "sent": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "by_status": by_status,
        "achieved_per_s": in_time / duration_s if duration_s > 0 else math.nan,
        "p50_s": percentile(ok, 50),
        "p95_s": percentile(ok, 95),
        "p99_s": percentile(ok, 99),
        "max_s": max(ok) if ok else math.nan,
    }


def sustainable(s: dict[str, Any], cfg: Config) -> bool:
    return (
        s["errors"] == 0
        and s["p99_s"] <= cfg.p99_limit_s
        and s["achieved_per_s"] >= 0.95 * s["rate"]
    )


# --- server samples ----------------------------------------------------------------------------


class Sampler:
    """Every `every_s`: server RSS (MiB, process + children) and queue depth from /metrics."""

    def __init__(self, url: str, pid: int, every_s: float = 1.0) -> None:
        self.url, self.every_s = url, every_s
        self.proc = psutil.Process(pid)
        self.samples: list[dict[str, float]] = []
        self._t0 = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss_mb(self) -> float:
        procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def _loop(self) -> None:
        while not self._done.is_set():
            depth = scrape(self.url).get("gpm_queue_depth{}", math.nan)
            with contextlib.suppress(psutil.Error):
                t = time.perf_counter() - self._t0
                self.samples.append({"t": t, "rss_mb": self.rss_mb(), "queue_depth": depth})
            self._done.wait(self.every_s)

    def mark(self) -> float:
        return time.perf_counter() - self._t0

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def windows(records: list[Record], duration_s: float, window_s: float) -> list[dict[str, Any]]:
    """Per send-time window: requests, errors, p50/p95/p99 of successful latencies."""
    out = []
    for w in range(math.ceil(duration_s / window_s)):
        lo, hi = w * window_s, (w + 1) * window_s
        part = [r for r in records if lo <= r.sent < hi]
        ok = [r.latency for r in part if r.status == 200]
        out.append(
            {
                "t_s": lo,
                "requests": len(part),
                "errors": len(part) - len(ok),
                "p50_s": percentile(ok, 50),
                "p95_s": percentile(ok, 95),
                "p99_s": percentile(ok, 99),
            }
        )
    return out


def counter(metrics: dict[str, float], route: str, status: str) -> float:
    return metrics.get(f"gpm_requests_total{{route={route},status={status}}}", 0.0)


# --- phases ------------------------------------------------------------------------------------


def hold_rate(steps: list[dict[str, Any]], margin: int) -> float:
    """The sustainable rate `margin` steps below the last sustainable one (0.0 if none)."""
    ok = [s["rate"] for s in steps if s["sustainable"]]
    return ok[max(0, len(ok) - 1 - margin)] if ok else 0.0


def step_up(url: str, groups: list[dict], cfg: Config) -> tuple[float, list[dict[str, Any]]]:
    """Raise the rate until a step is not sustainable; the last sustainable rate and all steps."""
    steps, best, rate = [], 0.0, cfg.start_rate
    while rate <= cfg.max_rate:
        s = summarize(asyncio.run(open_loop(url, rate, cfg.step_s, groups)), rate, cfg.step_s)
        s["sustainable"] = sustainable(s, cfg)
        steps.append(s)
        print(f"step {rate:7.1f}/s: {summary_line(s)} sustainable={s['sustainable']}", flush=True)
        if not s["sustainable"]:
            break
        best = rate
        rate = round(rate * cfg.rate_factor, 2)
        settle(url)
    return best, steps


def settle(url: str, timeout_s: float = 60.0) -> None:
    """Wait until the server's queue is empty (between phases)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and scrape(url).get("gpm_queue_depth{}", 0.0) > 0:
        time.sleep(0.2)
    time.sleep(1.0)


def summary_line(s: dict[str, Any]) -> str:
    return (
        f"sent={s['sent']} errors={s['errors']} achieved={s['achieved_per_s']:.1f}/s "
        f"p50={s['p50_s']:.3f}s p99={s['p99_s']:.3f}s"
    )


async def burst(url: str, rate: float, groups: list[dict], cfg: Config) -> dict[str, Any]:
    """`rate`/s through `AsyncGPMClient` with retries for `cfg.burst_s`; every group must score."""
    from gprl_client.client import AsyncGPMClient

    n = max(1, int(rate * cfg.burst_s))
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=256)
    client = AsyncGPMClient(
        url,
        max_retries=300,  # ~5 min of 1 s Retry-After waits: bounded, and enough to drain
        backoff=0.25,
        max_backoff=4.0,
        max_concurrency=100_000,
        timeout=60.0,
        transport=httpx.AsyncHTTPTransport(limits=limits),
        seed=cfg.seed,
    )
    before = scrape(url)
    start = time.perf_counter()
    finished: list[float] = []

    async def one(i: int) -> Any:
        await asyncio.sleep(i / rate)
        res = await client.score([groups[i]])
        finished.append(time.perf_counter() - start)
        return res

    async with client:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    after = scrape(url)
    failed = sum(int(r.failed.sum()) for r in results)
    return {
        "rate": rate,
        "requests": n,
        "shed_429": counter(after, "/score", "429") - counter(before, "/score", "429"),
        "served_200": counter(after, "/score", "200") - counter(before, "/score", "200"),
        "client_retries": client.retries,
        "client_failures": client.failures,
        "failed_groups": failed,
        "all_scored_s": max(finished) if finished else math.nan,
        "results": results,
    }


def check_sample(url: str, groups: list[dict], results: list[Any], k: int = 60) -> dict[str, Any]:
    """Re-score up to `k` burst groups one at a time and compare (atol 1e-4)."""
    import torch

    from gprl_client.client import GPMClient

    idx = list(range(0, len(groups), max(1, len(groups) // k)))[:k]
    mismatched = 0
    with GPMClient(url, max_retries=10) as client:
        for i in idx:
            ref = client.score([groups[i]])
            got = results[i]
            if not torch.allclose(ref.rewards, got.rewards, atol=1e-4, rtol=1e-4):
                mismatched += 1
    return {"compared": len(idx), "mismatched": mismatched}
