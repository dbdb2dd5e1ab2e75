"""Peak memory of one policy forward + backward at lm_compare's batch shape, with and without
gradient checkpointing (each in its own process, so each peak is its own).

    python -m benchmarks.lm_compare.memory_probe [--tokens 640] [--completion 512] [--out FILE]

An lm_compare arm trains on 2 prompts x G = 4 completions per step; at a 512-token cap a
sequence is up to ~640 tokens with its prompt. The probe runs the converted SmolLM2 policy on
random ids of that shape, takes the log-probabilities of the completion part (as GRPO's loss
does) and back-propagates their mean. It writes the peak resident memory (GiB) of each mode
and their ratio; it does not run TRL, the reference model or generation, so an arm's own peak
(`peak_rss_gib` in its record) is higher.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/results/lm_compare_memory_probe.json")


def one(batch: int, tokens: int, completion: int, checkpointing: bool, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.lm_compare.arms import peak_rss_gib
    from benchmarks.lm_run import default_policy

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(default_policy(), dtype=torch.float32)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits[:, -completion - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -completion:, None])
    logp.mean().backward()
    return {"peak_rss_gib": peak_rss_gib(), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="sequences per step (2 prompts x G=4)")
    p.add_argument("--tokens", type=int, default=640, help="prompt + completion tokens")
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--one", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not 0 < a.completion < a.tokens:
        p.error("--completion must be in (0, --tokens)")
    if a.one:
        res = one(a.batch, a.tokens, a.completion, a.one == "checkpointing", a.threads)
        print(json.dumps(res))
        return res
    shape = ["--batch", str(a.batch), "--tokens", str(a.tokens), "--completion", str(a.completion)]
    modes = {}
    for mode in ("plain", "checkpointing"):
        cmd = [sys.executable, "-m", "benchmarks.lm_compare.memory_probe", *shape]
        cmd += ["--threads", str(a.threads), "--one", mode]
        print(f"{mode} ...", flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        modes[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{mode}: {modes[mode]}", flush=True)
    ratio = modes["checkpointing"]["peak_rss_gib"] / modes["plain"]["peak_rss_gib"]
    result = {
        "shape": {"batch": a.batch, "tokens": a.tokens, "completion": a.completion},
        "threads": a.threads,
        "modes": modes,
        "peak_ratio_checkpointing_vs_plain": round(ratio, 3),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ratio {ratio:.3f}; wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
