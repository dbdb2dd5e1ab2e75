"""Several lm_compare runs side by side against one verifier service, for a machine with room
for more than one trainer at a time (a GPU; the 2-core CPU fits two arms at a 256-token cap
with `--jobs 2 --threads 1`, one at 512; `python -m benchmarks.lm_compare` trains the arms one
after another).

    python -m benchmarks.lm_compare.parallel --device cuda --time-limit-s 540 \\
        --run "--out DIR_A --steps 40 --judge JUDGE" --run "--out DIR_B --prompt-set one_axis"

Per run, three phases, each the same `python -m benchmarks.lm_compare` command path pointed at
the shared service with `--gpm-url`: prepare (prompts, base answers, α/λ before training), then
one process per arm (every arm of every run, `--jobs` at a time), then the report. Files,
resuming and skipping are those of a single run; an arm that finished in an earlier launch is
not launched again and is entered in `parallel.json` as skipped. With `--time-limit-s`, each
arm gets the time left after `--reserve-s` (held-out answers, report, margin) as
`--train-budget-s`: the arms of a run then stop together at the step the first of them
reached when its budget ran out (arms.py). Each process logs to `<out>/logs/`; this command
prints progress and writes `<out>/parallel.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lm_compare import run as lm_compare
from benchmarks.lm_compare.arms import arm_record
from benchmarks.lm_run import default_policy, start_service
from benchmarks.servers import free_port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="one lm_compare argv (quoted)")
    p.add_argument("--device", default="cpu", help="cpu | cuda, for the service and every run")
    p.add_argument("--gpm-model", default=None, help="verifier checkpoint (default: embedded)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--time-limit-s", type=float, default=0.0, help="whole command (0: none)")
    p.add_argument("--reserve-s", type=float, default=150.0, help="kept for answers + report")
    p.add_argument("--poll-s", type=float, default=30.0, help="progress line interval")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="arm processes at once (0: all). On an H200 (140 GiB) six SmolLM2 arms at G=4, 8 "
        "prompts/step, cap 256 ran out of memory (17-29 GiB each): use 4",
    )
    return p.parse_args(argv)


class Job:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log, self.t0 = name, log, time.perf_counter()
        with log.open("a") as fh:  # a resumed run keeps the log of the phase it skips
            cmd = [sys.executable, "-u", "-m", "benchmarks.lm_compare", *argv]
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            fh.flush()
            self.offset = fh.tell()
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.wall_s: float | None = None

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.wall_s is None:
            self.wall_s = round(time.perf_counter() - self.t0, 1)
        return rc

    def output(self) -> str:
        """What this launch wrote (the log may hold earlier launches above it)."""
        with self.log.open("rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")

    def last_line(self) -> str:
        lines = self.output().strip().splitlines()
        return lines[-1][-120:] if lines else ""


Spec = tuple[str, list[str], Path]  # name, lm_compare argv, log file


def exit_reason(rc: int | None) -> str:
    """A note for a job's return code: a SIGKILL on Linux is nearly always the out-of-memory
    killer (two 512-token CPU arms need more than 24 GiB), and the fix is fewer `--jobs`."""
    if rc == -9:
        return " (killed: SIGKILL, usually out of memory; rerun the same command with fewer --jobs)"
    if rc is not None and rc < 0:
        return f" (killed by signal {-rc})"
    return ""


def run_jobs(
    specs: list[Spec],
    env: dict[str, str],
    t0: float,
    poll_s: float,
    jobs: int = 0,
    extra: Any = lambda: [],
) -> dict[str, Any]:
    """Run every spec, at most `jobs` at once (0: all), each launched with `extra()` appended to
    its argv (evaluated at launch: a queued arm gets the budget left when it starts). Prints one
    progress line per running job every `poll_s`; never raises on a failed job."""
    queue, running, done = list(specs), [], []
    next_print = time.perf_counter() + poll_s
    while queue or running:
        while queue and (not jobs or len(running) < jobs):
            name, argv, log = queue.pop(0)
            running.append(Job(name, [*argv, *extra()], log, env))
        time.sleep(1.0)
        for j in [j for j in running if j.poll() is not None]:
            running.remove(j)
            done.append(j)
            print(f"[{time.perf_counter() - t0:5.0f} s] {j.name}: rc {j.proc.returncode}"
                  f"{exit_reason(j.proc.returncode)}, {j.wall_s} s", flush=True)  # fmt: skip
            if j.proc.returncode:
                print(j.output()[-3000:], file=sys.stderr, flush=True)
        if time.perf_counter() >= next_print:
            next_print += poll_s
            for j in running:
                print(f"[{time.perf_counter() - t0:5.0f} s] {j.name}: {j.last_line()}")
            sys.stdout.flush()
    return {j.name: {"rc": j.proc.returncode, "wall_s": j.wall_s, "log": str(j.log)} for j in done}


def arm_specs(
    runs: list[list[str]], outs: list[Path], arms: list[list[str]], common: list[str]
) -> tuple[list[Spec], dict[str, Any]]:
    """One job per arm still to train; an arm with a record is not launched again (a rerun
    that adds arms), and is entered as skipped, so this launch's `wall_s` are only times it
    measured (the first launch's stay under `earlier` in parallel.json)."""
    specs: list[Spec] = []
    finished: dict[str, Any] = {}
    for r, o, names in zip(runs, outs, arms, strict=True):
        for arm in names:
            name, log = f"{o.name}/{arm}", o / "logs" / f"{arm}.log"
            if arm_record(o, arm).exists():
                finished[name] = {"rc": 0, "skipped": "done before", "log": str(log)}
            else:
                specs.append((name, [*r, *common, "--arms", arm, "--no-report"], log))
    return specs, finished


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """This launch's summary, with the ones before it (a resumed run) kept under `earlier`."""
    earlier: list[dict[str, Any]] = []
    if path.exists():
        prev = json.loads(path.read_text())
        earlier = [*prev.pop("earlier", []), prev]
    path.write_text(json.dumps({**summary, "earlier": earlier}, default=str, indent=1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    t0 = time.perf_counter()
    runs = [shlex.split(r) for r in a.run]
    parsed = [lm_compare.parse_args(r) for r in runs]
    outs = [Path(r.out) for r in parsed]
    if len(set(outs)) != len(outs):
        raise SystemExit("every --run needs its own --out")
    if any(r.policy is None for r in parsed):
        default_policy()  # convert the GGUF once, before several processes would race to
    common = ["--device", a.device, "--threads", str(a.threads)]
    common += ["--gpm-model", a.gpm_model] if a.gpm_model else []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    phases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gprl-lm-parallel-") as tmp:
        server = start_service(free_port(), a.gpm_model, Path(tmp), a.threads, a.device)
        try:
            from gprl_client import GPMClient

            GPMClient([server.url]).wait_ready(timeout=900)
            common += ["--gpm-url", server.url]
            prepare = [*common, "--arms", "--no-report"]
            specs: list[Spec] = [
                (f"{o.name}/prepare", [*r, *prepare], o / "logs" / "prepare.log")
                for r, o in zip(runs, outs, strict=True)
            ]
            phases["prepare"] = run_jobs(specs, env, t0, a.poll_s)
            if any(v["rc"] for v in phases["prepare"].values()):
                raise SystemExit("a prepare phase failed: see its log")

            def budget() -> list[str]:
                if not a.time_limit_s:
                    return []
                left = a.time_limit_s - (time.perf_counter() - t0) - a.reserve_s
                return ["--train-budget-s", f"{max(left, 1.0):.0f}"]

            specs, finished = arm_specs(runs, outs, [p.arms for p in parsed], common)
            for name in finished:
                print(f"[{time.perf_counter() - t0:5.0f} s] {name}: done before, skipped")
            sys.stdout.flush()
            phases["arms"] = {**finished, **run_jobs(specs, env, t0, a.poll_s, a.jobs, budget)}
            specs = [
                (f"{o.name}/report", [*r, *common, "--arms"], o / "logs" / "report.log")
                for r, o in zip(runs, outs, strict=True)
            ]
            phases["report"] = run_jobs(specs, env, t0, a.poll_s)
        finally:
            server.stop()
    summary = {"settings": vars(a), "phases": phases, "wall_s": round(time.perf_counter() - t0, 1)}
    for o in outs:
        write_summary(o / "parallel.json", summary)
    failed = [k for ph in phases.values() for k, v in ph.items() if v["rc"]]
    print(f"parallel: {summary['wall_s']:.0f} s; failed: {failed or 'none'}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(1 if any(v["rc"] for ph in main()["phases"].values() for v in ph.values()) else 0)
