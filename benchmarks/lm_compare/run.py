"""GPRL against scalar GRPO on a real LM, through the real verifier service, on CPU.

    python -m benchmarks.lm_compare --judge JUDGE_DIR      # make lm-compare

Phases, each written to `<out>/` and skipped when its file exists (a rerun resumes):
1. `prompts.json`: training and held-out prompts (benchmarks/lm_compare/prompts.py);
2. `base.json`: the base policy's held-out answers, and α / λ of the training mix measured on
   base-policy groups before any training;
3. `arms/<arm>.json`: per arm, training (per-step drift state, TRL reward / length / KL) and
   its held-out answers, same seed, prompts and steps for every arm (arms.py);
4. `lm_compare.json` + `lm_compare.png`: held-out evaluation of every arm (evaluate.py) and the
   table (report.py). Always recomputed from the files above.
The service (`gpm-server serve`, default verifier unless `--gpm-model`) runs as a subprocess for
the whole command and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.arms import ARMS, ISSUE_ARMS, arm_record, generate_answers, train_arm
from benchmarks.lm_compare.prompts import (
    DATA_ROOT,
    load_prompts,
    one_axis_prompts,
    select_prompts,
    stored_form,
    with_system,
)
from benchmarks.lm_run import default_policy, start_service
from benchmarks.servers import free_port

# Settings a rerun (or a parallel process on the same --out) may change: which arms to train
# now, the judge (evaluation only), where the service is, whether to write the report.
EVAL_ONLY = {"arms", "judge", "judge_backbone", "judge_max_length", "gpm_url", "no_report"}
EVAL_ONLY |= {"train_budget_s", "report_only"}
# Shapes only the oracle arms (each records it), so arms added later may name it.
EVAL_ONLY |= {"oracle_axis"}
# A --report-only rerun may evaluate finished phases elsewhere (the training used the saved ones).
REPORT_ONLY_FREE = {"device", "threads", "data_root"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/lm_compare")
    p.add_argument("--policy", default=None, help="causal LM folder (default: SmolLM2-135M)")
    p.add_argument("--gpm-model", default=None, help="verifier checkpoint (default: embedded)")
    p.add_argument("--judge", default=None, help="folder with bt_head.safetensors (none: skip)")
    p.add_argument("--judge-backbone", default="gguf:smollm2")
    p.add_argument("--judge-max-length", type=int, default=384)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--arms", nargs="*", default=list(ISSUE_ARMS), choices=list(ARMS))
    p.add_argument(
        "--prompt-set",
        default="mix",
        choices=["mix", "one_axis"],
        help="mix: instruction + red-team (two active axes); one_axis: lm_run's plain prompts",
    )
    p.add_argument(
        "--oracle-axis",
        type=int,
        default=None,
        help="the exploited axis, for the oracle arms gprl_oracle and gprl_drop* (oracle.py)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--generations", type=int, default=4, help="G, responses per prompt")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--n-train", type=int, default=24, help="training prompts (half per source)")
    p.add_argument("--n-eval", type=int, default=32, help="held-out prompts (half per source)")
    p.add_argument("--eval-samples", type=int, default=1, help="answers per held-out prompt")
    p.add_argument("--alpha-prompts", type=int, default=8, help="train prompts for α/λ at t=0")
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--system", default="Answer briefly.", help="system message ('': none)")
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument(
        "--lr-scheduler",
        default="linear",
        choices=["linear", "constant"],
        help="linear: TRL's default, decaying to 0 over --steps (a late correction then acts on "
        "small updates); constant: the same step size throughout",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: the same updates for about half the "
        "memory (one SmolLM2 forward + backward of 8 x 640 tokens: 11.6 GiB peak without, 6.2 "
        "with; benchmarks/lm_compare/memory_probe.py)",
    )
    p.add_argument("--beta", type=float, default=0.04, help="initial KL coefficient (> 0)")
    p.add_argument("--baseline-steps", type=int, default=4, help="drift baseline window")
    p.add_argument("--ema-rate", type=float, default=0.25)
    p.add_argument("--threshold", type=float, default=0.02, help="τ_D")
    p.add_argument("--threads", type=int, default=1, help="torch threads (trainer and service)")
    p.add_argument("--device", default="cpu", help="cpu | cuda: policy, trainer and service")
    p.add_argument("--gpm-url", default=None, help="use this running service instead of one")
    p.add_argument("--no-report", action="store_true", help="train only; skip the evaluation")
    p.add_argument(
        "--train-budget-s",
        type=float,
        default=0.0,
        help="stop an arm's training after this many seconds (0: never; recorded as steps_done)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only re-evaluate the finished phases in --out (any --device); trains nothing",
    )
    return p.parse_args(argv)


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel processes share --out
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _load_policy(policy: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    return model.to(device), AutoTokenizer.from_pretrained(policy)


def measure_mix(client: Any, model: Any, tok: Any, prompts: list[dict], a: Any) -> dict[str, Any]:
    """α (variance shares of λ_l ŝ_l) and mean λ per source, on G base-policy answers to each of
    the first `alpha_prompts` training prompts: the spectrum the arms start from."""
    from gprl_client.advantages import axis_variance

    sub = prompts[: a.alpha_prompts]
    fake = argparse.Namespace(**{**vars(a), "eval_samples": a.generations})
    answers = generate_answers(model, tok, sub, fake)
    groups = [
        (with_system(p["prompt"], a.system), [x["text"] for x in answers if x["prompt_index"] == i])
        for i, p in enumerate(sub)
    ]
    res = client.score(groups)
    var = axis_variance(res.group_scores, res.eigenvalues)  # (N, K)
    out: dict[str, Any] = {"groups": len(groups), "mean_tokens": None}
    for source in (None, "instruction", "red_team"):
        rows = [i for i, p in enumerate(sub) if source is None or p["source"] == source]
        v = var[rows].nanmean(0)
        out[source or "all"] = {
            "alpha": (v / v.sum()).tolist(),
            "mean_axis_variance": v.tolist(),
            "mean_eigenvalues": res.eigenvalues[rows].mean(0).tolist(),
        }
    out["mean_tokens"] = sum(x["tokens"] for x in answers) / len(answers)
    return out


def run_phases(a: argparse.Namespace, out: Path, client: Any, policy: str, work: Path) -> None:
    model, tok = _load_policy(policy, a.device)
    if not (out / "prompts.json").exists():
        if a.prompt_set == "one_axis":
            chosen = one_axis_prompts(a.n_train, a.n_eval)
        else:
            chosen = select_prompts(
                a.data_root, tok, a.n_train, a.n_eval, a.max_prompt_tokens, a.seed, a.system
            )
        _write(out / "prompts.json", stored_form(chosen))
    prompts = load_prompts(out, a.data_root)
    if not (out / "base.json").exists():
        t0 = time.perf_counter()
        mix = measure_mix(client, model, tok, prompts["train"], a)
        answers = generate_answers(model, tok, prompts["eval"], a)
        _write(out / "base.json", {"mix_before_training": mix, "answers": answers,
                                   "wall_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(f"base: α={mix['all']['alpha']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    del model
    for name in a.arms:
        path = arm_record(out, name)
        if path.exists():
            print(f"{name}: done before, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        trained, record = train_arm(name, a, client, policy, prompts["train"], work)
        t1 = time.perf_counter()
        record["answers"] = generate_answers(trained, tok, prompts["eval"], a)
        record["eval_generate_s"] = round(time.perf_counter() - t1, 1)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        _write(path, record)
        print(f"{name}: {record['wall_s']:.0f} s, corrections {record['corrections']}", flush=True)
        del trained


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the service child is stopped too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(a)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(a: argparse.Namespace) -> Path:
    from benchmarks.lm_compare.report import evaluate_all

    needs_axis = [n for n in a.arms if ARMS[n].oracle]
    if needs_axis and a.oracle_axis is None:
        raise SystemExit(f"arms {needs_axis} need --oracle-axis: the axis the policy exploits")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    settings.pop("out")
    saved = out / "settings.json"
    free = EVAL_ONLY | (REPORT_ONLY_FREE if a.report_only else set())
    if a.report_only:
        missing = [
            f for f in ("settings.json", "prompts.json", "base.json") if not (out / f).exists()
        ]
        if missing:
            raise SystemExit(f"--report-only: {out} lacks {missing}; run without it first")
    if saved.exists():  # resuming: every phase must come from the same settings
        # An option added after the run was saved counts as its default (what the run did).
        before = {**vars(parse_args([])), **json.loads(saved.read_text())}
        diff = {
            k: (before.get(k), v)
            for k, v in settings.items()
            if k not in free and before.get(k) != v
        }
        if diff:
            raise SystemExit(f"{out} holds a run with other settings {diff}: use another --out")
    if not a.report_only:  # the saved settings stay those the phases ran with
        _write(saved, settings)
    policy = a.policy or default_policy()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gprl-lm-compare-") as tmp:
        work = Path(tmp)
        server = None
        if a.gpm_url is None:
            server = start_service(free_port(), a.gpm_model, work, a.threads, a.device)
        try:
            from gprl_client import GPMClient

            client = GPMClient([a.gpm_url or server.url])
            client.wait_ready(timeout=900)  # the service answers 503 while its model loads
            if not a.report_only:
                run_phases(a, out, client, policy, work)
            path = out if a.no_report else evaluate_all(a, out, client)
        finally:
            if server is not None:
                server.stop()
    print(f"lm compare: {time.perf_counter() - t0:.0f} s; report {path}", flush=True)
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
