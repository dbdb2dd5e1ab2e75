"""`make bench`: the verifier over HTTP against its peers, all measured in one run.

    python -m benchmarks.run_all [--model tiny|smollm2] [--quick] [--out benchmarks/results]

Phases (sequential, so they never compete for the CPU):
1. in-process baselines on the pre-encoded sequences: the raw batched forward at several batch
   sizes (*the limit*), one batch-1 forward (latency floor), the G = 8 groups with and without
   prefix sharing, bf16 against fp32;
2. the real service (`gpm-server serve` subprocess): single-response OpenRLHF requests
   (`/openrlhf/reward`) at each concurrency level, then GRPO groups (`/score`, one request per
   prompt); batch and padding statistics from `/metrics`, peak RSS sampled from /proc;
3. the per-request peer (`benchmarks.per_request_server`, serve_rm.py style) on the same loads;
4. vLLM offline pooling (`benchmarks.vllm_pooling`) when its separate venv exists.

Writes `bench_<model>[_quick].json` and `.png` to `--out`; prints the target ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import baselines, loadgen, models, report, servers, vllm_baseline, workloads


@dataclass
class Config:
    model: str
    quick: bool
    levels: list[int]
    level_seconds: float
    max_requests: int
    n_groups: int
    group_concurrency: int
    g: int = 8
    single_prompt_tokens: tuple[int, int] = (150, 250)
    single_response_tokens: tuple[int, int] = (40, 120)
    group_prompt_tokens: int = 512
    group_response_tokens: int = 128
    single_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32, 64])
    group_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    raw_budget_s: float = 20.0
    max_batch_tokens: int = 16384
    max_batch_size: int | None = None  # None: the raw forward's best batch size (phase 1)
    max_wait_ms: float = 5.0
    device: str = "cpu"  # cpu | cuda | cuda:N: the in-process model and both servers
    dtype: str = "float32"
    model_workers: int = 1  # the service's model threads (each with --threads torch threads)
    peer_threads: int | None = None  # torch threads of the per-request peer (None: --threads)
    vllm: bool = True
    min_requests_factor: int = 2  # at least this × the concurrency per level (up to 64)
    min_requests: int = 4
    b1_samples: int = 8  # batch-1 forwards timed for the latency floor
    bf16_group: int = 8  # responses of one group compared in bf16 against fp32


def make_config(args: argparse.Namespace) -> Config:
    if args.model in ("tiny", "llama-small-random"):
        cfg = Config(
            model=args.model,
            quick=args.quick,
            levels=[1, 16, 64, 256],
            level_seconds=6.0,
            max_requests=3000,
            n_groups=32,
            group_concurrency=8,
            raw_budget_s=5.0,
        )
    elif args.model == "llama8b-random":  # a GPU: full levels, larger batches
        cfg = Config(
            model=args.model,
            quick=args.quick,
            levels=[1, 16, 64, 256],
            level_seconds=10.0,
            max_requests=2048,
            n_groups=32,
            group_concurrency=8,
            raw_budget_s=5.0,
            single_batch_sizes=[1, 8, 32, 64, 128],
            group_batch_sizes=[8, 16, 32, 64],
            max_batch_tokens=65536,
        )
    else:  # SmolLM2 on a shared 2-core CPU: ~seconds per sequence, so few requests per level
        cfg = Config(
            model=args.model,
            quick=args.quick,
            levels=[1, 16, 64],
            level_seconds=10.0,
            max_requests=64,
            n_groups=2,
            group_concurrency=2,
            raw_budget_s=1.0,
            min_requests_factor=1,
            single_batch_sizes=[1, 8, 16],
            group_batch_sizes=[8],
            b1_samples=2,
            bf16_group=4,
        )
    if args.quick:
        cfg.levels, cfg.level_seconds, cfg.max_requests = [1, 16, 64], 1.0, 200
        cfg.n_groups, cfg.raw_budget_s, cfg.vllm = 4, 1.0, False
        cfg.single_batch_sizes, cfg.group_batch_sizes = [1, 8, 32], [8, 16]
    if args.levels:
        cfg.levels = [int(x) for x in args.levels.split(",")]
    names = ("level_seconds", "max_requests", "n_groups", "raw_budget_s", "max_batch_size")
    for name in (*names, "model_workers", "peer_threads", "device", "dtype"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.vllm = cfg.vllm and not args.skip_vllm
    return cfg


def requests_for(concurrency: int, rate: float, cfg: Config) -> int:
    """Enough requests for a steady state: `min_requests_factor` × the concurrency (1× above
    64), or `level_seconds` at the expected rate, whichever is more; capped by `max_requests`
    but never below the concurrency."""
    floor = cfg.min_requests_factor * concurrency if concurrency <= 64 else concurrency
    floor = max(floor, cfg.min_requests)
    wanted = max(floor, math.ceil(rate * cfg.level_seconds))
    return max(concurrency, min(cfg.max_requests, wanted))


def in_process(model: Any, single_seqs: list, group_seqs: list, cfg: Config) -> dict[str, Any]:
    """Phase 1: the raw-forward limits, the batch-1 latency floor, sharing, bf16 error."""
    out: dict[str, Any] = {}
    out["single_raw"] = baselines.raw_forward(
        model, single_seqs, cfg.single_batch_sizes, cfg.raw_budget_s
    )
    out["single_forward_b1_s"] = baselines.single_forward_s(model, single_seqs, cfg.b1_samples)
    out["group_raw"] = baselines.raw_forward(
        model, group_seqs, cfg.group_batch_sizes, cfg.raw_budget_s
    )
    out["group_raw_shared"] = baselines.raw_forward(
        model, group_seqs, cfg.group_batch_sizes, cfg.raw_budget_s, sharing=True
    )
    best_bs = out["group_raw"]["best"]["batch_size"]
    out["sharing_savings"] = baselines.sharing_savings(model, group_seqs, best_bs)
    return out


def bf16_check(path: str, model: Any, group_seqs: list, cfg: Config) -> dict[str, Any]:
    """bf16 backbone against fp32: score errors on one group (G = `bf16_group`), and the
    sequences/s of both on that batch."""
    from gpm_server.model import GPM

    if cfg.dtype != "float32":
        return {"skipped": f"the run itself is in {cfg.dtype}"}
    low = GPM.from_pretrained(path, dtype="bfloat16", device=cfg.device)
    low.prefix_sharing = False
    sub = group_seqs[: cfg.bf16_group]
    old = model.prefix_sharing
    model.prefix_sharing = False
    try:
        err = baselines.dtype_error(model, low, sub, cfg.bf16_group, model.tau)
    finally:
        model.prefix_sharing = old
    err["fp32_sequences_per_s"] = err.pop("ref_sequences_per_s")
    err["bf16_sequences_per_s"] = err.pop("other_sequences_per_s")
    return err


def _measure(
    server: servers.Server, route: str, payloads: list, per_request: int, tokens: list[int], conc
) -> dict[str, Any]:
    before = loadgen.scrape(server.url)
    with servers.rss_sampler(server) as rss:
        res = loadgen.run_load(f"{server.url}{route}", payloads, conc, per_request, tokens)
    res.server = loadgen.batch_stats(before, loadgen.scrape(server.url))
    res.peak_rss_mb = max(rss, default=None)
    ms = f"p50 {res.p50_s * 1e3:9.1f} ms  p99 {res.p99_s * 1e3:9.1f} ms"
    print(f"    {res.responses_per_s:8.2f} resp/s  {ms}  errors {res.errors}", flush=True)
    return res.as_dict()


def http_phase(
    started: dict[str, servers.Server], cfg: Config, single: tuple, groups: tuple, rate: float
) -> dict[str, Any]:
    """Every load on every server, *interleaved* per level (the servers alternate, so a change
    in background load hits both alike): single-response levels, then the groups."""
    payloads, tokens = single
    items, group_tokens = groups
    out: dict[str, Any] = {name: {"single": []} for name in started}
    for i, conc in enumerate(cfg.levels):
        n = min(requests_for(conc, rate, cfg), len(payloads))
        order = list(started) if i % 2 == 0 else list(reversed(started))
        for name in order:
            print(f"  {name:12s} c={conc:4d} n={n:5d}", flush=True)
            out[name]["single"].append(
                _measure(started[name], "/openrlhf/reward", payloads[:n], 1, tokens[:n], conc)
            )
    bodies = [workloads.score_payload(it) for it in items]
    per_group = [sum(group_tokens[i * cfg.g : (i + 1) * cfg.g]) for i in range(len(items))]
    for name, server in started.items():
        print(f"  {name:12s} groups n={len(items)} G={cfg.g}", flush=True)
        out[name]["groups"] = _measure(
            server, "/score", bodies, cfg.g, per_group, cfg.group_concurrency
        )
        out[name]["rss_after_mb"] = server.rss_mb()
    return out


def run(cfg: Config) -> dict[str, Any]:
    from gpm_server.model import GPM

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="gprl-bench-"))
    path = models.prepare(cfg.model, work, device=cfg.device, dtype=cfg.dtype)
    print(f"model {cfg.model}: {path}", flush=True)
    model = GPM.from_pretrained(path, device=cfg.device, dtype=cfg.dtype)
    tok = model.tokenizer
    single = workloads.single_items(
        tok, cfg.max_requests, cfg.single_prompt_tokens, cfg.single_response_tokens
    )
    groups = workloads.group_items(
        tok, cfg.n_groups, cfg.g, cfg.group_prompt_tokens, cfg.group_response_tokens
    )
    single_seqs = model.encode(workloads.pairs(single))
    group_seqs = model.encode(workloads.pairs(groups))
    print("phase 1: in-process baselines", flush=True)
    result: dict[str, Any] = {"config": cfg.__dict__, "model_path": path}
    result["workload"] = _workload_summary(single_seqs, group_seqs)
    result["in_process"] = in_process(model, single_seqs, group_seqs, cfg)
    result["in_process"]["bf16"] = bf16_check(path, model, group_seqs, cfg)
    rate = result["in_process"]["single_raw"]["best"]["sequences_per_s"]
    if cfg.max_batch_size is None:  # tuned to this machine, as an operator would
        best = result["in_process"]["single_raw"]["best"]["batch_size"]
        cfg.max_batch_size = max(best, cfg.group_batch_sizes[0])
    del model
    print("phase 2: HTTP (service and per-request peer, interleaved)", flush=True)
    live: dict[str, servers.Server] = {}
    try:
        live["service"] = servers.start_service(
            path,
            work,
            max_batch_tokens=cfg.max_batch_tokens,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            model_workers=cfg.model_workers,
            device=cfg.device,
            dtype=cfg.dtype,
        )
        live["per_request"] = servers.start_per_request(
            path, work, threads=cfg.peer_threads, device=cfg.device, dtype=cfg.dtype
        )
        payloads = [workloads.openrlhf_payload(tok, it) for it in single]
        result.update(
            http_phase(
                live,
                cfg,
                (payloads, [s.cost for s in single_seqs]),
                (groups, [s.cost for s in group_seqs]),
                rate,
            )
        )
    finally:
        for server in live.values():
            server.stop()
    print("phase 3: vLLM", flush=True)
    result["vllm"] = (
        vllm_baseline.run(path, group_seqs, single_seqs, work, threads=servers.THREADS)
        if cfg.vllm
        else {"skipped": "disabled (--quick or --skip-vllm)"}
    )
    result["targets"] = report.targets(result)
    result["environment"] = _environment(started, cfg.device)
    return result


def _workload_summary(single_seqs: list, group_seqs: list) -> dict[str, Any]:
    def mean(xs: list[int]) -> float:
        return sum(xs) / max(1, len(xs))

    return {
        "single_sequences": len(single_seqs),
        "single_mean_tokens": mean([s.cost for s in single_seqs]),
        "group_sequences": len(group_seqs),
        "group_mean_tokens": mean([s.cost for s in group_seqs]),
        "group_mean_prompt_tokens": mean([s.prompt_len for s in group_seqs]),
    }


def _environment(started: float, device: str = "cpu") -> dict[str, Any]:
    import os

    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "device": device,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPRL verifier benchmarks (see module doc)")
    parser.add_argument("--model", choices=models.NAMES, default="tiny")
    parser.add_argument("--device", help="cpu (default), cuda or cuda:N: in process and servers")
    parser.add_argument("--dtype", help="float32 (default) or bfloat16 / float16")
    parser.add_argument("--quick", action="store_true", help="small, fast run (CI smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--levels", help="comma-separated concurrency levels")
    parser.add_argument("--level-seconds", type=float, dest="level_seconds")
    parser.add_argument("--max-requests", type=int, dest="max_requests")
    parser.add_argument("--groups", type=int, dest="n_groups")
    parser.add_argument("--raw-seconds", type=float, dest="raw_budget_s")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        dest="max_batch_size",
        help="the service's batch size limit (default: the raw forward's best batch size)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads, here and in every server (default: torch's)"
    )
    parser.add_argument(
        "--model-workers",
        type=int,
        dest="model_workers",
        help="the service's model threads, batches run at once (default 1)",
    )
    parser.add_argument(
        "--peer-threads",
        type=int,
        dest="peer_threads",
        help="torch threads of the per-request peer (default: --threads); give it the cores "
        "the service's model threads use, for an equal-cores comparison",
    )
    args = parser.parse_args(argv)
    cfg = make_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        servers.THREADS = args.threads
    result = run(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{cfg.model}{'_quick' if cfg.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report.plot(result, args.out / f"{stem}.png")
    print(report.summary(result))
    print(f"wrote {args.out / (stem + '.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
