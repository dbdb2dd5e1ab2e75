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
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from benchmarks import models
from benchmarks.loadgen import scrape
from benchmarks.servers import Server, free_port
from benchmarks.soak_phases import (
    Config,
    Sampler,
    burst,
    check_sample,
    hold_rate,
    make_groups,
    open_loop,
    settle,
    step_up,
    summarize,
    summary_line,
    sustainable,
    windows,
)

RESULTS = Path(__file__).resolve().parent / "results"

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
        settle(url)
        t_hold = sampler.mark()
        print(f"holding {rate}/s for {cfg.duration_s:.0f} s", flush=True)
        held = asyncio.run(open_loop(url, rate, cfg.duration_s, groups))
        hold = summarize(held, rate, cfg.duration_s)
        print(f"hold: {summary_line(hold)}", flush=True)
        settle(url)
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
        settle(url)
        t_rec = sampler.mark()
        rec = asyncio.run(open_loop(url, rate, cfg.recover_s, groups))
        recovery = summarize(rec, rate, cfg.recover_s)
        recovery["sustainable"] = sustainable(recovery, cfg)
        print(f"recovery: {summary_line(recovery)}", flush=True)
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
