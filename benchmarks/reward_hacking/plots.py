"""Plots of the reward-hacking results (mean over seeds, band = ± one std)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLORS = {
    "scalar_grpo": "tab:red",
    "gprl_global": "tab:orange",
    "gprl_no_controller": "tab:purple",
    "gprl_full": "tab:blue",
    "gprl_full_k1": "tab:brown",
    "gprl_full_clean": "tab:green",
    "gprl_no_controller_clean": "tab:olive",
    "gprl_full_paper": "tab:cyan",
    "gprl_full_paper_clean": "tab:gray",
}
OVERVIEW = (
    ("true_quality", "true quality Q (higher is better)", "linear"),
    ("proxy_reward", "proxy reward: s(y ≻ y_ref) under the run's proxy", "symlog"),
    ("log_length", "log-length ℓ (ideal: ℓ* = 0 on average)", "linear"),
    ("drift", "drift D(t) = KL(ᾱ(t) ‖ α(0))", "linear"),
    ("beta", "KL coefficient β", "linear"),
    ("clip_eps", "PPO clip ε", "linear"),
)
STYLES = {
    "gprl_full_k1": "--",
    "gprl_full_clean": ":",
    "gprl_no_controller_clean": ":",
    "gprl_full_paper": "-.",
    "gprl_full_paper_clean": ":",
}
AXIS_NAMES = ("helpful", "harmless", "verbosity")
DIMENSION_VARIANTS = (
    "scalar_grpo",
    "gprl_global",
    "gprl_no_controller",
    "gprl_full",
    "gprl_full_clean",
    "gprl_full_paper",
    "gprl_full_paper_clean",
)


def _series(stats: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([np.nan if v is None else v for v in stats["mean"]], dtype=float)
    std = np.array([np.nan if v is None else v for v in stats["std"]], dtype=float)
    return mean, std


def _band(ax, stats: dict[str, list], **kwargs) -> None:
    mean, std = _series(stats)
    steps = np.arange(len(mean))
    (line,) = ax.plot(steps, mean, lw=1.4, **kwargs)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)


def plot_overview(result: dict, path: Path) -> Path:
    """True quality, proxy reward, length, D, β, ε over steps, every variant."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    for ax, (key, title, scale) in zip(axes.flat, OVERVIEW, strict=True):
        for name, data in result["variants"].items():
            style = STYLES.get(name, "-")
            _band(ax, data["per_step"][key], color=COLORS.get(name), ls=style, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="lower left")
    seeds = result["config"]["seeds"]
    fig.suptitle(f"Reward-hacking testbed: mean over {seeds} seeds, band ± 1 std", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dimensions(result: dict, path: Path) -> Path:
    """Per-axis variance shares ᾱ_l(t) (top) and controller weights m_l (bottom), per variant."""
    names = [n for n in DIMENSION_VARIANTS if n in result["variants"]]
    fig, axes = plt.subplots(
        2, len(names), figsize=(3.4 * len(names), 6.5), sharey="row", constrained_layout=True
    )
    axes = np.asarray(axes).reshape(2, len(names))
    for col, name in enumerate(names):
        steps = result["variants"][name]["per_step"]
        for row, key in enumerate(("alpha", "m")):
            ax = axes[row, col]
            for axis, label in enumerate(AXIS_NAMES):
                if f"{key}_{axis}" in steps:
                    _band(ax, steps[f"{key}_{axis}"], label=label)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step")
        axes[0, col].set_title(name, fontsize=10)
    axes[0, 0].set_ylabel("variance share ᾱ_l(t)")
    axes[1, 0].set_ylabel("controller weight m_l")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Per-dimension signals (axis 3 is the proxy's verbosity axis)", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(result: dict, directory: Path, prefix: str = "reward_hacking") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        plot_overview(result, directory / f"{prefix}_overview.png"),
        plot_dimensions(result, directory / f"{prefix}_dimensions.png"),
    ]
