"""`gprl train [GPRL options] -- [OpenRLHF options]`: OpenRLHF 0.11.2 with the GPRL learner.

Everything after `--` goes to `openrlhf.cli.train_ppo_ray` unchanged. Before running it the
launcher
1. refuses settings GPRL cannot work with (`check_openrlhf_args`, a clear message per problem);
2. starts Ray (unless already started) with `runtime_env.py_modules = [gprl_client, gprl_core]`,
   so every Ray node can import both packages: the trainer actor class and the function that
   sets the policy actors' clip ε are pickled by reference, and they import gprl_core. Ray
   uploads the packages once per job; nothing has to be installed on the workers beyond
   OpenRLHF itself (gprl_core needs only torch and numpy). On a cluster started with
   `ray job submit`, pass `--runtime-env-json '{"py_modules": [...]}'` (both packages) or install
   `gprl` in the image instead;
3. replaces `openrlhf.trainer.ppo_trainer.PPOTrainer` (which `train_ppo_ray` imports inside
   `train()`) with a factory that starts `GPRLPPOTrainer` with the GPRL options;
4. runs `openrlhf.cli.train_ppo_ray` as `__main__` with the OpenRLHF arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import gprl_client
import gprl_core
from gprl_core.drift import PRESETS, DriftConfig, drift_config

OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"
# Knobs taken from OpenRLHF's own flags (β₀ = --algo.kl.init_coef, ε₀ = --actor.eps_clip).
_FROM_OPENRLHF = {"beta", "clip_eps"}
_NOT_FLAGS = _FROM_OPENRLHF | {"rule"}  # the rule comes with its preset (--drift.preset)
_LIST_FLAGS = {"axis_prior"}  # comma-separated numbers, one per axis


def gprl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gprl train",
        description="Run OpenRLHF 0.11.2 (train_ppo_ray) with GPRL advantages and drift control."
        " Usage: gprl train [GPRL options] -- [OpenRLHF options]",
    )
    p.add_argument("--no-drift-control", action="store_true", help="monitor only: m, β, ε fixed")
    p.add_argument(
        "--normalization",
        choices=["per_dimension", "global"],
        default="per_dimension",
        help="per-dimension (GPRL) or global normalisation (ablation)",
    )
    p.add_argument(
        "--report-dir",
        default=None,
        help="drift report folder (default: <--ckpt.output_dir>/gprl_drift)",
    )
    p.add_argument("--no-ray-init", action="store_true", help="do not start Ray here")
    p.add_argument(
        "--drift.preset",
        dest="preset",
        choices=sorted(PRESETS),
        default="project",
        help="controller rule: 'paper' (GPRL as published) or 'project' (growth-gated variant);"
        " the --drift.* knobs below override single values of the preset",
    )
    p.add_argument(
        "--drift.axis-prior",
        dest="drift_axis_prior",
        type=_floats,
        default=None,
        help="fixed factors on m from the first step, one per axis, e.g. 1,1,1,0 to switch axis 3"
        " off (scaled to mean 1; `gprl audit-length` suggests one)",
    )
    for f in fields(DriftConfig):
        if f.name not in _NOT_FLAGS | _LIST_FLAGS:
            flag = "--drift." + f.name.replace("_", "-")
            p.add_argument(
                flag,
                dest=f"drift_{f.name}",
                type=type(f.default),
                default=None,
                help=f"DriftConfig.{f.name} (default {f.default})",
            )
    return p


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _openrlhf_view(argv: list[str]) -> argparse.Namespace:
    """Parse only the OpenRLHF flags GPRL depends on (defaults as in OpenRLHF 0.11.2)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--algo.advantage.estimator", default="gae")
    p.add_argument("--algo.kl.init_coef", type=float, default=0.01)
    p.add_argument("--algo.kl.target", type=float, default=None)
    p.add_argument("--algo.kl.use_loss", action="store_true")
    p.add_argument("--rollout.n_samples_per_prompt", type=int, default=1)
    p.add_argument("--reward.remote_url", default=None)
    p.add_argument("--train.async_enable", action="store_true")
    p.add_argument("--train.agent_func_path", default=None)
    p.add_argument("--algo.dynamic_filtering_enable", action="store_true")
    p.add_argument("--reward.overlong_buffer_len", type=float, default=None)
    p.add_argument("--reward.stop_properly_penalty_coef", type=float, default=None)
    known, _ = p.parse_known_args(argv)
    return known


def check_openrlhf_args(argv: list[str]) -> list[str]:
    """Problems that make a GPRL run impossible or meaningless; empty when all is well."""
    a = vars(_openrlhf_view(argv))
    problems = []
    if a["algo.advantage.estimator"] != "group_norm":
        problems.append(
            f"--algo.advantage.estimator is {a['algo.advantage.estimator']!r}: GPRL replaces "
            "the group-relative (critic-free) advantage, pass --algo.advantage.estimator group_norm"
        )
    if a["algo.kl.init_coef"] <= 0:
        problems.append(
            f"--algo.kl.init_coef is {a['algo.kl.init_coef']}: it must be > 0, OpenRLHF only "
            "builds the reference model then and the drift controller raises β from it"
        )
    if a["rollout.n_samples_per_prompt"] < 2:
        problems.append(
            f"--rollout.n_samples_per_prompt is {a['rollout.n_samples_per_prompt']}: GPRL "
            "compares responses within a group, pass G >= 2 (the paper uses 8)"
        )
    if not a["algo.kl.use_loss"]:
        problems.append(
            "--algo.kl.use_loss is not set: with the KL penalty in the reward, the drift "
            "controller's β would reach the reward one step late and each token's advantage "
            "would be Â(i) minus its KL-to-go instead of exactly Â(i); pass --algo.kl.use_loss "
            "(e.g. with --algo.kl.estimator k3)"
        )
    if a["algo.kl.target"] is not None:
        problems.append("--algo.kl.target (adaptive KL) conflicts with the drift controller's β")
    if not a["reward.remote_url"]:
        problems.append(
            "--reward.remote_url is missing: point it at the GPM service, "
            "e.g. http://gpm:8000/openrlhf/reward"
        )
    if a["train.async_enable"]:
        problems.append("--train.async_enable uses PPOTrainerAsync, which GPRL does not extend")
    if a["train.agent_func_path"]:
        problems.append("--train.agent_func_path replaces the reward route GPRL reads from")
    if a["algo.dynamic_filtering_enable"]:
        problems.append(
            "--algo.dynamic_filtering_enable filters groups on the scalar scores, which are "
            "placeholders without reference answers"
        )
    for flag in ("reward.overlong_buffer_len", "reward.stop_properly_penalty_coef"):
        if a[flag] is not None:
            problems.append(f"--{flag} shapes the scalar reward, which GPRL does not use")
    return problems


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def gprl_options(ns: argparse.Namespace) -> dict[str, Any]:
    drift = {
        k[len("drift_") :]: v
        for k, v in vars(ns).items()
        if k.startswith("drift_") and v is not None
    }
    return {
        "drift_control": not ns.no_drift_control,
        "normalization": ns.normalization,
        "report_dir": ns.report_dir,
        "drift_preset": ns.preset,
        "drift": drift,
    }


def init_ray() -> None:
    """Start Ray with gprl_client and gprl_core shipped to every node, and OpenRLHF's default
    env vars."""
    import ray

    if ray.is_initialized():
        return
    env = {
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get(
            "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"
        ),
    }
    # Both packages by directory: gprl_client's modules import gprl_core on the workers too.
    packages = [str(Path(m.__file__).resolve().parent) for m in (gprl_client, gprl_core)]
    ray.init(runtime_env={"py_modules": packages, "env_vars": env})


def install(options: dict[str, Any]) -> None:
    """Make `train_ppo_ray` start the GPRL trainer (it imports PPOTrainer inside `train()`)."""
    from openrlhf.trainer import ppo_trainer

    from gprl_client.openrlhf.trainer import GPRLTrainerFactory

    ppo_trainer.PPOTrainer = GPRLTrainerFactory(options)


def train_main(argv: list[str]) -> int:
    ours, theirs = split_argv(argv)
    ns = gprl_parser().parse_args(ours)
    problems = check_openrlhf_args(theirs)
    if problems:
        print("gprl train: refusing these OpenRLHF settings:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    options = gprl_options(ns)
    try:  # fail here, not inside a Ray actor
        drift_config(options["drift_preset"], **options["drift"])
    except ValueError as err:
        print(f"gprl train: {err}", file=sys.stderr)
        return 2
    print("gprl train: GPRL options " + json.dumps(options), file=sys.stderr)
    if not ns.no_ray_init:
        init_ray()
    install(options)
    sys.argv = [OPENRLHF_MODULE, *theirs]
    runpy.run_module(OPENRLHF_MODULE, run_name="__main__", alter_sys=True)
    return 0
