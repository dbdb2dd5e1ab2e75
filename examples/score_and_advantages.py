"""Score a few groups through a running GPM service; print GPRL advantages and the drift monitor.

    gpm-server serve &                      # or: make serve
    python examples/score_and_advantages.py [http://127.0.0.1:8000] [--api-key KEY]

Each "training step" scores the same groups (tagged with run_id and step, so the service records
drift telemetry), computes per-dimension GPRL advantages locally and feeds the drift monitor
from the local group scores. At the end a second monitor is fed from the service's telemetry
instead; both must agree (the monitor takes either input).
"""

from __future__ import annotations

import argparse
import time
import uuid

import torch

from gprl_client import DriftMonitor, GPMClient, gprl_advantages
from gprl_client.drift import DriftConfig

GROUPS = [
    {
        "prompt": "Explain why the sky is blue in one short paragraph.",
        "responses": [
            "Sunlight scatters off air molecules; blue light scatters most (Rayleigh "
            "scattering), so the sky looks blue.",
            "Because it reflects the ocean.",
            "The sky is blue.",
            "Air molecules scatter short wavelengths far more than long ones, so scattered blue "
            "light reaches our eyes from every direction of the sky, while the sun itself looks "
            "slightly yellow.",
        ],
    },
    {
        "prompt": [{"role": "user", "content": "Write a haiku about the sea."}],
        "responses": [
            "Waves fold into foam / salt wind carries gull voices / the tide keeps its time",
            "The sea is big and wet.",
            "Blue water, blue sky, / boats drift on the horizon / evening brings them home",
        ],
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    run_id = f"example-{uuid.uuid4().hex[:8]}-{int(time.time())}"
    config = DriftConfig(baseline_steps=2)  # tiny demo: a baseline after two steps
    with GPMClient(args.url, api_key=args.api_key) as client:
        client.wait_ready(timeout=120)
        info = client.info()
        k = info["k"]
        print(f"model {info['model']}  K={k}  tau={info['tau']}  run_id={run_id}")
        local = DriftMonitor(k, config)
        for step in range(args.steps):
            res = client.score(GROUPS, run_id=run_id, step=step)
            if res.num_failed:
                print(f"step {step}: {res.num_failed} group(s) failed: {res.errors}")
            adv = gprl_advantages(res.embeddings, res.eigenvalues)
            state = local.update_from_group_scores(res.group_scores, res.eigenvalues)
            print(f"\nstep {step}")
            for n, group in enumerate(GROUPS if step == 0 else ()):  # the same groups each step
                print(f"  prompt {n}: λ = {_fmt(res.eigenvalues[n])}")
                for i in range(len(group["responses"])):
                    per_dim = adv.normalized[n, i]
                    print(
                        f"    response {i}: Â = {float(adv.advantages[n, i]):+.3f}  "
                        f"per-dimension Â_l = {_fmt(per_dim)}  reward = {res.rewards[n, i]:+.3f}"
                    )
            print(f"  monitor: {_state(state)}")

        telemetry = client.telemetry(run_id)
        remote = DriftMonitor(k, config)
        for stats in telemetry.ordered():
            remote.update_from_variance_sums(stats.sum_within_var, stats.n_groups)
        print(f"\nmonitor fed from /telemetry: {_state(remote.state)}")
        last = telemetry.ordered()[-1]
        print(f"telemetry, last step: mean Var(λ·ŝ) = {_fmt(last.mean_within_variance())}, "
              f"Cov(length, λ·ŝ) = {_fmt(last.length_covariance())}")  # fmt: skip
        print(f"client failures: {client.failures}, retries: {client.retries}")


def _fmt(values: object) -> str:
    return "[" + ", ".join(f"{float(v):+.3f}" for v in torch.as_tensor(values).tolist()) + "]"


def _state(state: object) -> str:
    alpha = getattr(state, "alpha", None)
    return (
        f"α = {_fmt(alpha) if alpha else None}  D = {state.drift:.4g}  "  # type: ignore[attr-defined]
        f"ready = {state.ready}"  # type: ignore[attr-defined]
    )


if __name__ == "__main__":
    main()
