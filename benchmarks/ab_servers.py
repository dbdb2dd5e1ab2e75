"""A/B of server configurations on one load: responses/s, latency, and where the CPU went.

Starts every configuration at once (service with N model threads, per-request peer with T torch
threads), then loads them in turn, level by level, `--repeats` times (so background changes hit
all alike), with the same single-response payloads `make bench` uses. Besides throughput and
latency it records the CPU cores each server process and the load generator used during the
level: a load generator that needs as much CPU as the server would measure itself.

    python -m benchmarks.ab_servers --model tiny --levels 1,64 --service-workers 1,2 \\
        --peer-threads 1,2 --requests 600 --out benchmarks/results/ab_servers.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen, models, servers, workloads


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(server: servers.Server, payloads: list, costs: list[int], conc: int) -> dict[str, Any]:
    before = loadgen.scrape(server.url)
    server_cpu, own_cpu, t0 = cpu_seconds(server.proc.pid), _own_cpu(), time.perf_counter()
    res = loadgen.run_load(f"{server.url}/openrlhf/reward", payloads, conc, 1, costs)
    wall = time.perf_counter() - t0
    row = res.as_dict()
    row["server_cpu_cores"] = (cpu_seconds(server.proc.pid) - server_cpu) / wall
    row["loadgen_cpu_cores"] = (_own_cpu() - own_cpu) / wall
    row["server"] = loadgen.batch_stats(before, loadgen.scrape(server.url))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--levels", default="1,64")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--service-workers", default="1,2", help="model threads per service")
    parser.add_argument("--peer-threads", default="1,2", help="torch threads per peer")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ab_servers.json"))
    args = parser.parse_args(argv)
    servers.THREADS = 1  # per model thread; the peers get theirs below
    work = Path(tempfile.mkdtemp(prefix="gprl-ab-"))
    path = models.prepare(args.model, work)
    from gpm_server.model import GPM

    model = GPM.from_pretrained(path)
    items = workloads.single_items(model.tokenizer, args.requests, (150, 250), (40, 120))
    costs = [s.cost for s in model.encode(workloads.pairs(items))]
    payloads = [workloads.openrlhf_payload(model.tokenizer, it) for it in items]
    del model
    live: dict[str, servers.Server] = {}
    rows: list[dict[str, Any]] = []
    try:
        for w in map(int, args.service_workers.split(",")):
            live[f"service_workers{w}"] = servers.start_service(
                path,
                work,
                max_batch_tokens=16384,
                max_batch_size=args.max_batch_size,
                max_wait_ms=5.0,
                model_workers=w,
            )
        for t in map(int, args.peer_threads.split(",")):
            live[f"per_request_threads{t}"] = servers.start_per_request(path, work, threads=t)
        for conc in map(int, args.levels.split(",")):
            for rep in range(args.repeats):
                for name, server in live.items():
                    row = {"name": name, "concurrency": conc, "repeat": rep}
                    row.update(measure(server, payloads, costs, conc))
                    rows.append(row)
                    print(
                        f"c={conc:4d} {name:22s} {row['responses_per_s']:8.1f} resp/s  "
                        f"p50 {row['p50_s'] * 1e3:7.1f} ms  p99 {row['p99_s'] * 1e3:7.1f} ms  "
                        f"server {row['server_cpu_cores']:.2f} cores  "
                        f"loadgen {row['loadgen_cpu_cores']:.2f} cores  errors {row['errors']}",
                        flush=True,
                    )
    finally:
        for server in live.values():
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"config": vars(args) | {"out": str(args.out)}, "model_path": path, "rows": rows}
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
