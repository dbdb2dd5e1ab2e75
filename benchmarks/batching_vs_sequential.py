"""Throughput of 64 concurrent single-response /score requests: micro-batching vs one at a time.

Same model, same requests, same process and run; modes interleaved round by round so machine
noise hits all of them alike. The app runs in-process (`create_app` + lifespan) and is called
through httpx's ASGI transport: routing, validation, tokenisation, batching and the forward pass
are all measured; the network is not.

Modes:
- `batched`: the service defaults (max_batch_size 64, max_wait_ms 5), 64 requests at once;
- `unbatched`: the same 64 concurrent requests with max_batch_size 1 (one forward per request);
- `serial`: default settings, the client sends the 64 requests one after another.

    python -m benchmarks.batching_vs_sequential [--model tiny|smollm2|PATH] [--rounds 5] \
        [--threads N]

Writes `benchmarks/results/batching_vs_sequential[_<model>].json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.models import prepare
from gpm_server.app import create_app, load_backend
from gpm_server.protocol import GPMBackend
from gpm_server.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = [
    "the sea",
    "tax law",
    "a lost key",
    "prime numbers",
    "coffee",
    "the moon",
    "rain",
    "chess",
]
MODES = {
    "batched": {"concurrent": True, "settings": {}},
    "unbatched": {"concurrent": True, "settings": {"max_batch_size": 1}},
    "serial": {"concurrent": False, "settings": {}},
}


def requests(n: int) -> list[dict[str, Any]]:
    """n single-response /score bodies of varied length (deterministic)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = " ".join(["and more"] * (i % 9))
        response = f"Here is a short note about {topic} {words}, number {i}."
        out.append({"groups": [{"prompt": f"Write about {topic}.", "responses": [response]}]})
    return out


async def run_mode(model: GPMBackend, mode: str, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    spec = MODES[mode]
    app = create_app(Settings(telemetry_db=":memory:", **spec["settings"]), model=model)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            while (await client.get("/ready")).status_code != 200:
                await asyncio.sleep(0.01)
            batches_before = app.state.batcher.batches_run
            started = time.perf_counter()
            if spec["concurrent"]:
                resps = await asyncio.gather(*(client.post("/score", json=b) for b in bodies))
            else:
                resps = [await client.post("/score", json=b) for b in bodies]
            elapsed = time.perf_counter() - started
            batches = app.state.batcher.batches_run - batches_before
    bad = [r.status_code for r in resps if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{mode}: {len(bad)} requests failed: {bad[:5]}")
    return {"seconds": elapsed, "requests_per_s": len(bodies) / elapsed, "forward_calls": batches}


def summarise(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        rps = [r[mode]["requests_per_s"] for r in rounds]
        out[mode] = {
            "requests_per_s_median": statistics.median(rps),
            "requests_per_s_all": rps,
            "forward_calls_median": statistics.median(r[mode]["forward_calls"] for r in rounds),
        }
    # Ratios per round (same round = same machine conditions), then the median.
    for other in ("unbatched", "serial"):
        ratios = [r["batched"]["requests_per_s"] / r[other]["requests_per_s"] for r in rounds]
        out[f"speedup_vs_{other}_median"] = statistics.median(ratios)
        out[f"speedup_vs_{other}_all"] = ratios
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        # smollm2 without the shipped default model: its backbone with random heads (same speed).
        path = args.model if Path(args.model).exists() else prepare(args.model, Path(tmp))
        model = load_backend(Settings(model=path, device=args.device))
    bodies = requests(args.requests)
    await run_mode(model, "batched", bodies[:8])  # warm-up, not recorded
    rounds = []
    for r in range(args.rounds):
        this = {mode: await run_mode(model, mode, bodies) for mode in MODES}
        rounds.append(this)
        line = ", ".join(f"{m} {v['requests_per_s']:.1f} req/s" for m, v in this.items())
        print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr)
    return {
        "benchmark": "batching_vs_sequential",
        "command": "python -m benchmarks.batching_vs_sequential " + " ".join(sys.argv[1:]),
        "model": args.model,
        "model_path": Path(path).name,
        "model_k": model.info.k,
        "device": model.info.device,
        "dtype": model.info.dtype,
        "requests": args.requests,
        "responses_per_request": 1,
        "rounds": args.rounds,
        "transport": "in-process ASGI (httpx.ASGITransport), no network",
        "modes": {m: {"concurrent": s["concurrent"], **s["settings"]} for m, s in MODES.items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "results": summarise(rounds),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a checkpoint path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). On a shared, oversubscribed machine "
        "use 1: spinning OpenMP threads can slow a tiny forward pass down 30-fold.",
    )
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = asyncio.run(main_async(args))
    suffix = "" if args.model == "tiny" else f"_{Path(args.model).name}"
    out = args.out or RESULTS / f"batching_vs_sequential{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    r = result["results"]
    print(
        f"batched {r['batched']['requests_per_s_median']:.1f} req/s, "
        f"unbatched {r['unbatched']['requests_per_s_median']:.1f} req/s, "
        f"serial {r['serial']['requests_per_s_median']:.1f} req/s; "
        f"speedup x{r['speedup_vs_unbatched_median']:.2f} (vs unbatched), "
        f"x{r['speedup_vs_serial_median']:.2f} (vs serial) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
