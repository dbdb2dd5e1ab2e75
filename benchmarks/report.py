"""The issue's target ratios, a text summary and the plot, from one run's result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _level(rows: list[dict[str, Any]], conc: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["concurrency"] == conc), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Every target of issue 9 that this run can measure: value, goal, met (None: not measured)."""
    ip = result["in_process"]
    limit = ip["single_raw"]["best"]["sequences_per_s"]
    ours, peer = result["service"]["single"], result["per_request"]["single"]
    c64, peer64 = _level(ours, 64), _level(peer, 64)
    c1 = _level(ours, 1)
    group_limit = ip["group_raw"]["best"]["sequences_per_s"]
    group_ours = result["service"]["groups"]["responses_per_s"]
    vllm = result.get("vllm", {}).get("groups", {}).get("sequences_per_s")
    rss = [r["peak_rss_mb"] for r in ours if r.get("peak_rss_mb")]
    out: dict[str, Any] = {"model": result["config"]["model"]}

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out[name] = {"value": value, "goal": goal, "met": met}

    v = _ratio(c64 and c64["responses_per_s"], limit)
    add("c64_vs_raw_limit", v, ">= 0.8 (SmolLM2)", None if v is None else v >= 0.8)
    v = c64 and c64["p99_s"] / c64["p50_s"]
    add("c64_p99_over_p50", v, "<= 3", None if v is None else v <= 3)
    v = peer64 and peer64["p99_s"] / peer64["p50_s"]
    add("per_request_c64_p99_over_p50", v, "peer: ~13 (serve_rm.py)", None)
    v = _ratio(c64 and c64["responses_per_s"], peer64 and peer64["responses_per_s"])
    add("c64_vs_per_request", v, ">= 5 (tiny model)", None if v is None else v >= 5)
    v = _ratio(group_ours, group_limit)
    add("groups_vs_raw_limit_unshared", v, ">= 2 (SmolLM2)", None if v is None else v >= 2)
    v = _ratio(group_ours, vllm)
    add("groups_vs_vllm", v, "> 1", None if v is None else v > 1)
    v = c1 and (c1["p50_s"] - ip["single_forward_b1_s"]) * 1e3
    add("c1_p50_minus_forward_ms", v, "<= 15", None if v is None else v <= 15)
    v = (rss[-1] - rss[0]) if len(rss) > 1 else None
    add("rss_growth_across_levels_mb", v, "flat (see soak for 10 min)", None)
    return out


def summary(result: dict[str, Any]) -> str:
    lines = [f"targets ({result['config']['model']}):"]
    for name, t in result["targets"].items():
        if isinstance(t, dict):
            value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
            met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
            lines.append(f"  {name:34s} {value:>10s}  goal {t['goal']:28s} {met}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ip = result["in_process"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for name, style in (("service", "o-"), ("per_request", "s--")):
        rows = result[name]["single"]
        ax.plot(
            [r["concurrency"] for r in rows],
            [r["responses_per_s"] for r in rows],
            style,
            label={"service": "gpm-server", "per_request": "per-request (serve_rm style)"}[name],
        )
    ax.axhline(
        ip["single_raw"]["best"]["sequences_per_s"],
        color="k",
        ls=":",
        label=f"raw forward limit (bs {ip['single_raw']['best']['batch_size']})",
    )
    ax.set(xscale="log", xlabel="concurrency", ylabel="responses / s", title="single-response load")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, color in (("service", "C0"), ("per_request", "C1")):
        rows = result[name]["single"]
        conc = [r["concurrency"] for r in rows]
        ax.plot(conc, [r["p50_s"] for r in rows], "o-", color=color, label=f"{name} p50")
        ax.plot(conc, [r["p99_s"] for r in rows], "^--", color=color, label=f"{name} p99")
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency (s)", title="latency")
    ax.legend(fontsize=8)
    ax = axes[2]
    bars = {
        "raw, no sharing": ip["group_raw"]["best"]["sequences_per_s"],
        "raw, sharing": ip["group_raw_shared"]["best"]["sequences_per_s"],
        "gpm-server": result["service"]["groups"]["responses_per_s"],
        "per-request": result["per_request"]["groups"]["responses_per_s"],
    }
    vllm = result.get("vllm", {}).get("groups", {}).get("sequences_per_s")
    if vllm:
        bars["vLLM pooling"] = vllm
    ax.bar(list(bars), list(bars.values()), color=["0.6", "0.4", "C0", "C1", "C2"][: len(bars)])
    ax.set(ylabel="responses / s", title=f"GRPO groups (G = {result['config']['g']})")
    ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"model: {result['config']['model']} — one run, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
