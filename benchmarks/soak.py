"""Soak and burst run of the real `gpm-server serve` on loopback (`make soak`).

Phases, all bounded (the run stops by itself):

1. **Step-up**: open-loop `/score` load (one group of G responses per request, sent on a fixed
   schedule whatever the answers do) at rates start, ×1.5, ... for `--step-s` each. A rate is
   sustainable when no request fails, p99 ≤ `--p99-limit-s` and ≥ 95 % of the schedule was
   answered in time. The hold rate R is the sustainable rate `--hold-margin-steps` steps below
   the last sustainable one (default 1: the last step passed only for `--step-s` seconds, and a
   10-minute hold at it shed a few requests in one latency spike), or the first if fewer passed.
2. **Hold** at R for `--duration` seconds: errors, latency percentiles per window, the server's
   RSS (psutil, with children) and queue depth (`gpm_queue_depth` from /metrics) every second.
3. **Burst** at 10 × R for `--burst-s` through `AsyncGPMClient` with retries: the service sheds
   with 429 (counted from /metrics), the client backs off and every group ends scored; a sample
   of the burst's groups is re-scored quietly and compared (nothing silently wrong).
4. **Recovery**: R again for `--recover-s`: no errors, p99 back under the limit, queue empty.

Writes `benchmarks/results/soak.json` and `soak.png`. Run: `python -m benchmarks.soak
[--duration 600] [--model tiny|smollm2|PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks import models
from benchmarks.loadgen import TRANSPORT_ERRORS, Connection, percentile, scrape, split_url
from benchmarks.servers import Server, free_port

RESULTS = Path(__file__).resolve().parent / "results"
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
        print(f"step {rate:7.1f}/s: {_line(s)} sustainable={s['sustainable']}", flush=True)
        if not s["sustainable"]:
            break
        best = rate
        rate = round(rate * cfg.rate_factor, 2)
        _settle(url)
    return best, steps


def _settle(url: str, timeout_s: float = 60.0) -> None:
    """Wait until the server's queue is empty (between phases)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and scrape(url).get("gpm_queue_depth{}", 0.0) > 0:
        time.sleep(0.2)
    time.sleep(1.0)


def _line(s: dict[str, Any]) -> str:
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


# --- run ---------------------------------------------------------------------------------------


def start_server(model: str, workdir: Path, cfg: Config) -> Server:
    port = free_port()
    script = Path(sys.executable).with_name("gpm-server")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "gpm_server.cli"]
    cmd += ["serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-queue", str(cfg.max_queue), "--max-wait-ms", str(cfg.max_wait_ms)]
    cmd += ["--max-in-flight", str(cfg.max_in_flight)]
    cmd += ["--telemetry-db", str(workdir / "telemetry.sqlite3"), "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(cfg.threads))
    env["MKL_NUM_THREADS"] = str(cfg.threads)
    server = Server(cmd, port, env, workdir / "service.log")
    server.wait_ready(900)
    return server


def run(cfg: Config) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    groups = make_groups(512, cfg.group_size, rng)
    with tempfile.TemporaryDirectory(prefix="gpm-soak-") as tmp:
        workdir = Path(tmp)
        named = cfg.model in ("tiny", "smollm2")
        model = models.prepare(cfg.model, workdir) if named else cfg.model
        server = start_server(model, workdir, cfg)
        try:
            result = _phases(server, groups, rng, cfg)
        finally:
            server.stop()
        result["server_exit_code"] = server.proc.returncode
    return result


def _phases(server: Server, groups: list[dict], rng: random.Random, cfg: Config) -> dict:
    url = server.url
    with Sampler(url, server.proc.pid) as sampler:
        t_step = sampler.mark()
        last_ok, steps = step_up(url, groups, cfg)
        if last_ok <= 0:
            raise SystemExit(f"not even {cfg.start_rate}/s is sustainable; lower --start-rate")
        rate = hold_rate(steps, cfg.hold_margin_steps)
        _settle(url)
        t_hold = sampler.mark()
        print(f"holding {rate}/s for {cfg.duration_s:.0f} s", flush=True)
        held = asyncio.run(open_loop(url, rate, cfg.duration_s, groups))
        hold = summarize(held, rate, cfg.duration_s)
        print(f"hold: {_line(hold)}", flush=True)
        _settle(url)
        t_burst = sampler.mark()
        burst_groups = make_groups(int(rate * cfg.burst_factor * cfg.burst_s), cfg.group_size, rng)
        b = asyncio.run(burst(url, rate * cfg.burst_factor, burst_groups, cfg))
        print(
            f"burst {b['rate']:.0f}/s: {b['requests']} requests, {b['shed_429']:.0f} shed (429), "
            f"{b['client_retries']} retries, {b['failed_groups']} failed, "
            f"all scored after {b['all_scored_s']:.1f} s",
            flush=True,
        )
        b["sample_check"] = check_sample(url, burst_groups, b.pop("results"))
        _settle(url)
        t_rec = sampler.mark()
        rec = asyncio.run(open_loop(url, rate, cfg.recover_s, groups))
        recovery = summarize(rec, rate, cfg.recover_s)
        recovery["sustainable"] = sustainable(recovery, cfg)
        print(f"recovery: {_line(recovery)}", flush=True)
        time.sleep(2 * sampler.every_s)
        depth_after = scrape(url).get("gpm_queue_depth{}", math.nan)
    samples = sampler.samples
    hold_rss = [s["rss_mb"] for s in samples if t_hold <= s["t"] < t_burst]
    tenth = max(1, len(hold_rss) // 10)
    return {
        "config": asdict(cfg),
        "sustainable_rate": last_ok,
        "hold_rate": rate,
        "steps": steps,
        "hold": {
            **hold,
            "windows": windows(held, cfg.duration_s, cfg.window_s),
            "peak_rss_mb": max(hold_rss, default=math.nan),
            "rss_first_tenth_mb": sum(hold_rss[:tenth]) / tenth if hold_rss else math.nan,
            "rss_last_tenth_mb": sum(hold_rss[-tenth:]) / tenth if hold_rss else math.nan,
            "max_queue_depth": max(
                (s["queue_depth"] for s in samples if t_hold <= s["t"] < t_burst), default=0
            ),
        },
        "burst": b,
        "recovery": {**recovery, "queue_depth_after": depth_after},
        "phase_marks_s": {"step": t_step, "hold": t_hold, "burst": t_burst, "recovery": t_rec},
        "samples": samples,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    w = result["hold"]["windows"]
    t = [x["t_s"] for x in w]
    for q in ("p50_s", "p95_s", "p99_s"):
        ax[0, 0].plot(t, [x[q] * 1000 for x in w], label=q[:-2])
    ax[0, 0].set(
        title=f"hold at {result.get('hold_rate', result['sustainable_rate'])}/s: latency",
        xlabel="s",
        ylabel="ms",
    )
    ax[0, 0].legend()
    steps = result["steps"]
    ax[0, 1].plot([s["rate"] for s in steps], [s["p99_s"] * 1000 for s in steps], "o-")
    ax[0, 1].set(title="step-up: p99 by offered rate", xlabel="requests/s", ylabel="p99 ms")
    ts = [s["t"] for s in result["samples"]]
    ax[1, 0].plot(ts, [s["rss_mb"] for s in result["samples"]])
    ax[1, 0].set(title="server RSS (whole run)", xlabel="s", ylabel="MiB")
    ax[1, 1].plot(ts, [s["queue_depth"] for s in result["samples"]])
    ax[1, 1].set(title="queue depth (sequences, whole run)", xlabel="s")
    for a in (ax[1, 0], ax[1, 1]):
        for name, mark in result["phase_marks_s"].items():
            a.axvline(mark, color="grey", lw=0.5)
            a.text(mark, a.get_ylim()[1], name, fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    d = Config()
    p.add_argument("--model", default=d.model, help="tiny | smollm2 | checkpoint path")
    p.add_argument("--duration", type=float, default=d.duration_s, help="hold seconds (600)")
    p.add_argument("--step-s", type=float, default=d.step_s, help="seconds per step-up rate")
    p.add_argument(
        "--hold-margin-steps",
        type=int,
        default=d.hold_margin_steps,
        help="hold this many sustainable steps below the last one (1)",
    )
    p.add_argument("--start-rate", type=float, default=d.start_rate, help="first rate (req/s)")
    p.add_argument("--p99-limit-s", type=float, default=d.p99_limit_s, help="sustainable p99")
    p.add_argument("--burst-s", type=float, default=d.burst_s, help="burst length (s)")
    p.add_argument("--recover-s", type=float, default=d.recover_s, help="recovery check (s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="server --max-queue")
    p.add_argument(
        "--max-in-flight", type=int, default=d.max_in_flight, help="server --max-in-flight"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="server torch threads (1)")
    p.add_argument("--out", default="soak", help="file stem under benchmarks/results/")
    a = p.parse_args(argv)
    cfg = Config(
        model=a.model,
        duration_s=a.duration,
        step_s=a.step_s,
        hold_margin_steps=a.hold_margin_steps,
        start_rate=a.start_rate,
        p99_limit_s=a.p99_limit_s,
        burst_s=a.burst_s,
        recover_s=a.recover_s,
        max_queue=a.max_queue,
        threads=a.threads,
        max_in_flight=a.max_in_flight,
        out=a.out,
    )
    return cfg


def verdict(r: dict[str, Any]) -> dict[str, bool]:
    b = r["burst"]
    return {
        "hold_no_errors": r["hold"]["errors"] == 0,
        "burst_shed_with_429": b["shed_429"] > 0,
        "burst_all_scored": b["failed_groups"] == 0 and b["client_failures"] == 0,
        "burst_sample_equal": b["sample_check"]["mismatched"] == 0,
        "recovered": bool(r["recovery"]["sustainable"]) and r["recovery"]["queue_depth_after"] == 0,
        "clean_exit": r["server_exit_code"] == 0,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gprl_client").setLevel(logging.ERROR)  # burst retries are expected
    cfg = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # this process only turns answers into tensors
    started = time.time()
    result = run(cfg)
    result["verdict"] = verdict(result)
    result["wall_s"] = time.time() - started
    result["environment"] = {"cpus": psutil.cpu_count(), "load_avg": list(psutil.getloadavg())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / cfg.out
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result["verdict"]), f"→ {stem}.json, {stem}.png", flush=True)
    return 0 if all(result["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
