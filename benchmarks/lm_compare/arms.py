"""The four arms, trained with TRL GRPO on the same prompts, seed and steps.

- `scalar_grpo`: GRPO on the GPM's scalar `rewards` field Σ_l λ_l ŝ_l / τ, group-normalised
  (`normalization="global"` with m = 1; tests/test_advantages.py shows it is exactly that);
- `gprl`: GPRL per-dimension advantages, no controller (monitor only);
- `gprl_paper`: GPRL with the paper's drift controller (`drift_config("paper")`);
- `gprl_project`: GPRL with the project's growth-gated controller (`drift_config("project")`).

An ablation, run only when named (`--arms ... global_paper`): `global_paper`, scalar GRPO's
advantage (`normalization="global"`: Σ_l m_l λ_l ŝ_l normalised once, so an axis weighs by its
share of the spread) with the paper's controller acting on m, β and ε. Three more need the
exploited axis named (`--oracle-axis L`, benchmarks/lm_compare/oracle.py): `gprl_oracle`, the
paper's correction on axis L at every step after the baseline; `gprl_drop`, m_L = 0 from the
first step; `gprl_drop_late`, m_L = 0 from the step the baseline is in; `gprl_drop_from2` and
`gprl_drop_from3`, m_L = 0 in training from step 2 or 3 on.

Every arm logs the drift monitor (D, α, growth) even when it does not act on it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.lm_compare.prompts import with_system
from benchmarks.lm_run import grpo_config, merge_steps, trainer_rows


@dataclass(frozen=True)
class Arm:
    normalization: str
    control: bool
    preset: str
    oracle: bool = False  # detection bypassed (oracle.py): needs --oracle-axis


ARMS: dict[str, Arm] = {
    "scalar_grpo": Arm("global", False, "project"),
    "gprl": Arm("per_dimension", False, "project"),
    "gprl_paper": Arm("per_dimension", True, "paper"),
    "gprl_project": Arm("per_dimension", True, "project"),
    "global_paper": Arm("global", True, "paper"),
    "gprl_oracle": Arm("per_dimension", True, "paper", oracle=True),
    "gprl_drop": Arm("per_dimension", False, "paper", oracle=True),
    "gprl_drop_late": Arm("per_dimension", False, "paper", oracle=True),
    "gprl_drop_from2": Arm("per_dimension", False, "paper", oracle=True),
    "gprl_drop_from3": Arm("per_dimension", False, "paper", oracle=True),
}
ISSUE_ARMS: tuple[str, ...] = ("scalar_grpo", "gprl", "gprl_paper", "gprl_project")  # the default


def arm_record(out: Path, name: str) -> Path:
    """Where a finished arm's record lives; an arm whose record exists is done and is skipped."""
    return out / "arms" / f"{name}.json"


def drift_settings(a: Any) -> dict[str, float]:
    """The knobs this experiment sets on both presets (the rest are each preset's defaults)."""
    return {"baseline_steps": a.baseline_steps, "ema_rate": a.ema_rate, "threshold": a.threshold}


def budget_callback(seconds: float, stop_file: Path) -> Any:
    """A TRL callback that ends training once `seconds` of wall time have passed (0: never),
    so an arm under a hard time limit still writes its record. The first arm of a run to run
    out writes the step it reached to `stop_file`; the run's other arms (started together, same
    cost per step) then stop at that same step, ahead or behind, so every arm trains the same
    number of steps. The record's `steps_done` says how far they got."""
    import json

    from transformers import TrainerCallback

    deadline = time.monotonic() + seconds

    class StopAtBudget(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if seconds <= 0:
                return control
            if not stop_file.exists() and time.monotonic() > deadline:
                tmp = stop_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"step": state.global_step}))
                with contextlib.suppress(FileExistsError):  # another arm got there first
                    os.link(tmp, stop_file)  # atomic: the file appears whole, once
                tmp.unlink()
            if stop_file.exists():
                stop = json.loads(stop_file.read_text())["step"]
                control.should_training_stop = state.global_step >= stop
            return control

    return StopAtBudget()


def train_arm(
    name: str, a: Any, client: Any, policy: str, train_prompts: list[dict[str, Any]], work: Path
) -> tuple[Any, dict[str, Any]]:
    """Train one arm for `a.steps` steps; returns the trained model and its per-step record."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from benchmarks.lm_compare.oracle import CONTROLLERS, controller_factory
    from gprl_client.adapters.trl import GPRLGRPOTrainer
    from gprl_client.drift import drift_config

    arm = ARMS[name]
    n = a.steps * a.prompts_per_step
    rows = [train_prompts[i % len(train_prompts)] for i in range(n)]
    data = Dataset.from_dict(
        {
            "prompt": [with_system(r["prompt"], a.system) for r in rows],
            "source": [r["source"] for r in rows],
        }
    )
    args = grpo_config(
        work / name / "trl",
        a,
        temperature=a.temperature,
        top_p=a.top_p,
        shuffle_dataset=False,  # the alternating instruction / red-team order, the same per arm
    )
    axis, prior = oracle_axis(name, a, client)
    trainer = GPRLGRPOTrainer(
        model=policy,
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(policy),
        gpm_client=client,
        drift_config=drift_config(arm.preset, **drift_settings(a), **prior),
        drift_control=arm.control,
        normalization=arm.normalization,
        run_id=f"lm-compare-{name}-seed{a.seed}",
        report_dir=work / name / "gprl_drift",
        callbacks=[
            budget_callback(getattr(a, "train_budget_s", 0.0), Path(a.out) / "stop_step.json")
        ],
    )
    if name in CONTROLLERS:  # detection bypassed: the oracle arm's own schedule
        trainer.drift_loop.controller_factory = controller_factory(name, axis)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    loop = trainer.drift_loop
    steps = merge_steps(loop.history, trainer_rows(trainer.state.log_history))
    corrections = [
        {
            "step": s["step"],
            "axis": s.get("over_exploited") if axis is None else axis,
            "D": s.get("D"),
        }
        for s in steps
        if s.get("active")
    ]
    record = {
        "arm": name,
        "normalization": arm.normalization,
        "control": arm.control,
        "preset": arm.preset,
        "oracle_axis": axis,
        "drift_config": loop.state_dict()["config"],
        "train_wall_s": round(wall, 1),
        "steps_done": trainer.state.global_step,
        "device": str(trainer.model.device),
        "cuda_peak_gib": (
            round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None
        ),
        "peak_rss_gib": peak_rss_gib(),
        "steps": steps,
        "corrections": corrections,
        "final_control": loop.state_dict()["controller"],
    }
    return trainer.model, record


def oracle_axis(name: str, a: Any, client: Any) -> tuple[int | None, dict[str, Any]]:
    """For an oracle arm, the named axis (checked against the verifier's K) and the drift
    config override it needs (gprl_drop: `axis_prior`, m_L = 0 from the first step);
    (None, {}) for every other arm."""
    from benchmarks.lm_compare.oracle import PRIOR_ARMS, drop_weights

    if not ARMS[name].oracle:
        return None, {}
    axis = getattr(a, "oracle_axis", None)
    if axis is None:
        raise SystemExit(f"arm {name} needs --oracle-axis: the axis the policy exploits")
    k = int(client.info()["k"])
    if not 0 <= axis < k:
        raise SystemExit(f"--oracle-axis {axis}: the verifier has axes 0..{k - 1}")
    prior = {"axis_prior": tuple(drop_weights(k, axis))} if name in PRIOR_ARMS else {}
    return axis, prior


def peak_rss_gib() -> float | None:
    """This process's peak resident memory so far, GiB (what decides how many arms fit in RAM
    side by side); None where the platform does not report it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 2)


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: list[dict[str, Any]], a: Any, batch_size: int = 32
) -> list[dict[str, Any]]:
    """`a.eval_samples` sampled answers per held-out prompt (seeded, same settings as training):
    `[{"prompt_index", "sample", "source", "text", "tokens", "hit_cap"}]`."""
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    jobs = [(i, s) for s in range(a.eval_samples) for i in range(len(prompts))]
    out: list[dict[str, Any]] = []
    torch.manual_seed(a.seed + 1000)  # the same sampling noise for every policy
    for start in range(0, len(jobs), batch_size):
        part = jobs[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                with_system(prompts[i]["prompt"], a.system),
                add_generation_prompt=True,
                tokenize=False,
            )
            for i, _ in part
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        gen = model.generate(
            **enc,
            max_new_tokens=a.max_completion_length,
            do_sample=True,
            temperature=a.temperature,
            top_p=a.top_p,
            pad_token_id=tokenizer.pad_token_id,
        )[:, enc["input_ids"].shape[1] :]
        for (i, s), ids in zip(part, gen, strict=True):
            ids = ids.tolist()
            ended = tokenizer.eos_token_id in ids
            if ended:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            ids = [t for t in ids if t != tokenizer.pad_token_id]
            out.append(
                {
                    "prompt_index": i,
                    "sample": s,
                    "source": prompts[i]["source"],
                    "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    "tokens": len(ids),
                    "hit_cap": not ended and len(ids) >= a.max_completion_length,
                }
            )
    out.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    return out


def nan_to_none(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x
