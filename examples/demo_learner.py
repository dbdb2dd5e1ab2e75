"""Demo GPRL learner: a toy policy learns from a running GPM service; writes a drift report.

    gpm-server serve &                        # or: make serve, or docker compose (docker/)
    python examples/demo_learner.py --url http://127.0.0.1:8000 --steps 12 --out demo-out

The policy is a softmax over a few canned responses per prompt, of varying quality and length
(a padded, repetitive answer is there to tempt a length-biased verifier). Each step it samples
G responses per prompt, scores them with `GPMClient.score` (tagged with run_id and step, so every
replica records drift telemetry), computes per-dimension GPRL advantages with the controller's
weights m, and takes a few PPO steps on the logits (clip ε and KL β toward the initial policy come
from the controller). The drift monitor is fed from the service's telemetry, merged exactly over
every `--url` (one per replica); if that fails it falls back to the local group scores and says
so in the report. Output: drift_report.json and drift_report.png (needs matplotlib) in --out.

How it differs from a real trainer: no language model, no tokens sampled, one "action" per
response; what is real is the service, the advantages, the telemetry and the drift control.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gprl_client import DriftController, DriftMonitor, GPMClient, gprl_advantages
from gprl_client.client import GPMClientError
from gprl_client.drift import DriftConfig

log = logging.getLogger("demo_learner")

_PAD = " To be clear and complete, let me restate the point once more in other words." * 4
# prompt -> [(label, response)]: good/short, good/long, padded, terse, wrong.
CANDIDATES: dict[str, list[tuple[str, str]]] = {
    "Why is the sky blue?": [
        ("good", "Air molecules scatter short (blue) wavelengths of sunlight much more than long "
                 "ones (Rayleigh scattering), so blue light reaches us from all over the sky."),
        ("good-long", "Sunlight contains every colour. Nitrogen and oxygen molecules are much "
                      "smaller than the wavelength of light, and such small particles scatter "
                      "light with a strength proportional to 1/wavelength^4 (Rayleigh "
                      "scattering). Blue light is therefore scattered several times more than "
                      "red, and we see that scattered blue light from every direction. At "
                      "sunset the light crosses more air, the blue is scattered away, and the "
                      "sun looks red."),
        ("padded", "Because of scattering." + _PAD),
        ("terse", "Scattering."),
        ("wrong", "Because the sky reflects the colour of the oceans."),
    ],
    "Give one tip for writing clear code.": [
        ("good", "Name things for what they mean: a good name removes the need for a comment."),
        ("good-long", "Keep functions small and give them names that say what they do. A reader "
                      "should understand a function from its name and signature; if it needs a "
                      "paragraph of comments, split it. Small named pieces are also easier to "
                      "test, reuse and delete."),
        ("padded", "Write clean code." + _PAD),
        ("terse", "Be clear."),
        ("wrong", "Put everything in one big function so it is all in one place."),
    ],
    "What is 12 times 12?": [
        ("good", "12 × 12 = 144."),
        ("good-long", "12 × 12 = 144: ten twelves are 120, and two more twelves add 24, "
                      "giving 120 + 24 = 144."),
        ("padded", "The answer is 144." + _PAD),
        ("terse", "144"),
        ("wrong", "12 × 12 = 124."),
    ],
}  # fmt: skip


class ToyPolicy:
    """Per prompt P, a categorical distribution over its C canned responses: logits `[P, C]`."""

    def __init__(self, num_prompts: int, num_candidates: int) -> None:
        self.logits = torch.zeros(num_prompts, num_candidates, requires_grad=True)
        self.reference = torch.log_softmax(self.logits.detach().clone(), dim=-1)  # π_ref

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), dim=-1)

    def sample(self, group_size: int, gen: torch.Generator) -> torch.Tensor:
        """Sampled candidate indices `[P, G]` (with replacement)."""
        return torch.multinomial(self.probs(), group_size, replacement=True, generator=gen)

    def ppo_update(
        self,
        actions: torch.Tensor,
        advantages: torch.Tensor,
        *,
        lr: float,
        epochs: int,
        clip_eps: float,
        beta: float,
    ) -> float:
        """PPO on the logits: clipped surrogate on `[P, G]` actions/advantages + β·KL(π‖π_ref).

        Returns KL(π‖π_ref) averaged over prompts after the update.
        """
        old_logp = torch.log_softmax(self.logits.detach(), dim=-1).gather(1, actions)
        opt = torch.optim.SGD([self.logits], lr=lr)
        for _ in range(epochs):
            logp_all = torch.log_softmax(self.logits, dim=-1)  # (P, C)
            ratio = torch.exp(logp_all.gather(1, actions) - old_logp)  # (P, G)
            clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
            surrogate = torch.minimum(ratio * advantages, clipped * advantages).mean()
            kl = (logp_all.exp() * (logp_all - self.reference)).sum(-1).mean()
            opt.zero_grad()
            (-surrogate + beta * kl).backward()
            opt.step()
        logp = torch.log_softmax(self.logits.detach(), dim=-1)
        return float((logp.exp() * (logp - self.reference)).sum(-1).mean())


def _monitor_step(
    client: GPMClient, monitor: DriftMonitor, run_id: str, step: int, res: Any
) -> tuple[Any, str, list[float] | None]:
    """Feed the monitor from the replicas' merged telemetry; local group scores as fallback.

    Returns (monitor state, source, Cov(length, λ·ŝ_l) per axis or None).
    """
    try:
        stats = client.telemetry(run_id, since_step=step).steps.get(step)
    except GPMClientError as exc:
        log.warning("telemetry unavailable (%s); monitor fed from local group scores", exc)
        stats = None
    if stats is None:
        return monitor.update_from_group_scores(res.group_scores, res.eigenvalues), "local", None
    state = monitor.update_from_variance_sums(stats.sum_within_var, stats.n_groups)
    return state, "telemetry", [float(v) for v in stats.length_covariance()]


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def _label_mass(labels: list[list[str]], probs: torch.Tensor) -> dict[str, float]:
    """Policy probability of each response label, averaged over prompts."""
    out: dict[str, float] = {}
    for n, row in enumerate(labels):
        for c, label in enumerate(row):
            out[label] = out.get(label, 0.0) + float(probs[n, c]) / len(labels)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The training loop; returns the report (also the content of drift_report.json)."""
    prompts = list(CANDIDATES)
    labels = [[label for label, _ in CANDIDATES[p]] for p in prompts]
    texts = [[text for _, text in CANDIDATES[p]] for p in prompts]
    run_id = args.run_id or f"demo-{uuid.uuid4().hex[:8]}"
    config = DriftConfig(baseline_steps=args.baseline_steps, ema_rate=args.ema_rate)
    gen = torch.Generator().manual_seed(args.seed)
    policy = ToyPolicy(len(prompts), len(texts[0]))
    history: list[dict[str, Any]] = []
    with GPMClient(args.url, api_key=args.api_key or None, timeout=args.timeout) as client:
        client.wait_ready(timeout=args.wait_ready, all_urls=True)
        info = client.info()
        k = int(info["k"])
        monitor, controller = DriftMonitor(k, config), DriftController(k, config)
        log.info("model %s, K=%d, run_id=%s, replicas=%s", info.get("model"), k, run_id, args.url)
        for step in range(args.steps):
            actions = policy.sample(args.group_size, gen)  # (P, G)
            groups = [
                {"prompt": p, "responses": [texts[n][int(a)] for a in actions[n]], "id": p}
                for n, p in enumerate(prompts)
            ]
            res = client.score(groups, run_id=run_id, step=step)
            adv = gprl_advantages(res.embeddings, res.eigenvalues, weights=controller.weights)
            kl = policy.ppo_update(
                actions,
                adv.advantages.float(),
                lr=args.lr,
                epochs=args.ppo_epochs,
                clip_eps=controller.clip_eps,
                beta=controller.beta,
            )
            state, source, len_cov = _monitor_step(client, monitor, run_id, step, res)
            control = controller.update(state)
            history.append(
                {
                    "step": step,
                    "label_mass": _label_mass(labels, policy.probs()),
                    "mean_response_tokens": float(res.response_tokens.float().mean()),
                    "failed_groups": res.num_failed,
                    "mean_axis_variance": adv.mean_axis_variance.tolist(),
                    "length_covariance": len_cov,
                    "monitor_source": source,
                    "drift": _none_if_nan(state.drift),
                    "threshold": _none_if_nan(control.threshold),
                    "noise_floor": _none_if_nan(state.noise_floor),
                    "growth": _none_if_nan(getattr(control, "growth", math.nan)),
                    "alpha": list(state.alpha) if state.alpha else None,
                    "over_exploited_axis": state.over_exploited,
                    "weights": list(control.weights),
                    "beta": control.beta,
                    "clip_eps": control.clip_eps,
                    "correction": control.active,
                    "kl_to_initial_policy": kl,
                    "policy": _policy_table(prompts, labels, policy.probs()),
                }
            )
            log.info(
                "step %d: P(good*) %.3f, D %s (τ_D %s), m %s, beta %.4f, eps %.3f (%s)",
                step,
                sum(v for lab, v in history[-1]["label_mass"].items() if lab.startswith("good")),
                f"{state.drift:.4f}",
                f"{control.threshold:.4f}",
                [round(w, 3) for w in control.weights],
                control.beta,
                control.clip_eps,
                source,
            )
        client_stats = {"failures": client.failures, "retries": client.retries}
    return {
        "run_id": run_id,
        "service": {k_: info.get(k_) for k_ in ("model", "k", "tau", "gated", "device", "dtype")},
        "urls": list(args.url),
        "config": asdict(config),
        "args": {
            k_: str(v) if isinstance(v, Path) else v
            for k_, v in vars(args).items()
            if k_ != "api_key"
        },
        "client": client_stats,
        "final_policy": _policy_table(prompts, labels, policy.probs()),
        "steps": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _policy_table(
    prompts: list[str], labels: list[list[str]], probs: torch.Tensor
) -> dict[str, dict[str, float]]:
    return {
        p: {label: round(float(probs[n, c]), 4) for c, label in enumerate(labels[n])}
        for n, p in enumerate(prompts)
    }


def plot_report(report: dict[str, Any], path: Path) -> bool:
    """Four panels: D(t), the variance shares ᾱ_l, the controller's m/β/ε, reward and length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    steps = report["steps"]
    t = [s["step"] for s in steps]
    nan = float("nan")
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax[0, 0].plot(t, [nan if s["drift"] is None else s["drift"] for s in steps], "o-", label="D(t)")
    tau_d = [nan if s["threshold"] is None else s["threshold"] for s in steps]
    ax[0, 0].plot(t, tau_d, "r--", label="threshold τ_D")
    fired = [(s["step"], s["drift"]) for s in steps if s["correction"]]
    if fired:
        ax[0, 0].plot(*zip(*fired, strict=True), "rx", ms=10, label="correction")
    ax[0, 0].set(title="drift D(t) = KL(ᾱ(t) ‖ α(0))", xlabel="step")
    ax[0, 0].legend()
    k = len(steps[0]["weights"])
    for l_ in range(k):
        alpha = [nan if s["alpha"] is None else s["alpha"][l_] for s in steps]
        ax[0, 1].plot(t, alpha, "o-", label=f"axis {l_}")
        ax[1, 0].plot(t, [s["weights"][l_] for s in steps], "o-", label=f"m_{l_}")
    ax[0, 1].set(title="variance shares ᾱ_l(t)", xlabel="step")
    ax[0, 1].legend(fontsize="small")
    twin = ax[1, 0].twinx()
    twin.plot(t, [s["beta"] for s in steps], "k--", label="β")
    twin.plot(t, [s["clip_eps"] for s in steps], "k:", label="clip ε")
    twin.legend(loc="lower right", fontsize="small")
    ax[1, 0].set(title="controller: weights m_l, β, ε", xlabel="step")
    ax[1, 0].legend(loc="upper left", fontsize="small")
    for label in steps[0]["label_mass"]:
        ax[1, 1].plot(t, [s["label_mass"][label] for s in steps], "o-", label=label)
    ax[1, 1].set(title="policy: probability per response kind", xlabel="step")
    ax[1, 1].legend(loc="upper left", fontsize="small")
    length = ax[1, 1].twinx()
    length.plot(t, [s["mean_response_tokens"] for s in steps], "k--", label="tokens")
    length.set_ylabel("mean response tokens (dashed)")
    fig.suptitle(f"GPRL demo learner, run {report['run_id']} ({report['service']['model']})")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "drift_report.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    written = [json_path]
    png_path = out_dir / "drift_report.png"
    if plot_report(report, png_path):
        written.append(png_path)
    return written


def replica_urls(dns_name: str) -> list[str]:
    """`host:port` → one base URL per address the name resolves to, e.g. a Kubernetes headless
    Service (k8s/base/service-headless.yaml) lists every ready replica this way."""
    host, _, port = dns_name.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {dns_name!r}")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", action="append", help="service base URL; repeat for replicas")
    p.add_argument(
        "--replicas-dns",
        metavar="HOST:PORT",
        help="resolve HOST to every replica (a headless Service) instead of --url",
    )
    p.add_argument("--api-key", default=os.environ.get("GPM_API_KEY"), help="default: $GPM_API_KEY")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--group-size", type=int, default=6, help="G responses per prompt and step")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--baseline-steps", type=int, default=3, help="steps averaged into α(0)")
    p.add_argument("--ema-rate", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--wait-ready", type=float, default=900.0, help="wait for /ready (s)")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    args = p.parse_args(argv)
    if args.replicas_dns:
        args.url = replica_urls(args.replicas_dns)
    args.url = args.url or ["http://127.0.0.1:8000"]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    args = parse_args(argv)
    report = run(args)
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
