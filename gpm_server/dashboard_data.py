"""What the dashboard plots, computed from what the service already holds.

- `drift_series`: the service stores per-step sums, not the learner's drift state. To plot
  α_l(t), D(t), τ_D, m_l, β, ε and the corrections it replays `gprl_core.drift`'s monitor and
  controller over the stored steps, one update per stored step in step order, exactly as a
  learner fed from this telemetry with the same `DriftConfig` does (`update_from_variance_sums`).
  The learner's own m/β/ε are never sent to the service: with other knobs, another start step or
  several replicas (each stores only what it served) the learner's values differ from the replay.
- `metrics_summary`: the few cumulative numbers of the Prometheus registry the load panels need
  (the page takes rates and windowed quantiles from the change between two polls, as PromQL's
  `rate` and `histogram_quantile` would).

Series are column-major (one list per line, aligned with `steps`), the layout uPlot draws
directly; NaN (undefined: before the baseline, skipped steps) is sent as null.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry

from gprl_core.drift import DriftConfig, DriftController, DriftMonitor
from gprl_core.telemetry import RunTelemetry

# Routes whose requests count as the service's load (the dashboard's own polling does not).
INFERENCE_ROUTES = ("/score", "/compare", "/openrlhf/reward", "/get_reward")


def _num(x: float | int | None) -> float | int | None:
    """JSON-safe number: NaN and ±inf become None."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return x


def _axes(values: tuple[float, ...] | None, k: int) -> list[float | None]:
    return [None] * k if values is None else [_num(float(v)) for v in values]


def drift_series(run: RunTelemetry, config: DriftConfig | None = None) -> dict[str, Any]:
    """Replay the monitor and controller over `run`; T stored steps, K axes.

    Returns `steps` [T]; per axis (K lists of T): `variance` (mean within-group variance, the
    monitor's input), `alpha` (ᾱ_l(t), the EMA of the shares), `growth` (g_l(t)), `weights`
    (m_l); per step (T): `drift` (D), `threshold` (τ_D), `beta`, `clip_eps`, `active` (a
    correction at that step), `corrections` (cumulative), `over_exploited` (l*),
    `n_responses`; and `baseline` (α(0), K, once known), `config`.
    """
    config = config or DriftConfig()
    ordered = run.ordered()
    k = ordered[0].k if ordered else 0
    axis_names = ("variance", "alpha", "growth", "weights")
    out: dict[str, Any] = {"run_id": run.run_id, "k": k, "config": asdict(config), "steps": []}
    out.update({name: [[] for _ in range(k)] for name in axis_names})
    scalar_names = ("drift", "threshold", "beta", "clip_eps", "active", "corrections")
    out.update({name: [] for name in (*scalar_names, "over_exploited", "n_responses")})
    out["baseline"] = None
    if not ordered:
        return out
    prior = config.prior_for(k)
    monitor, controller = DriftMonitor(k, config), DriftController(k, config)
    for stats in ordered:
        m = monitor.update_from_variance_sums(stats.sum_within_var, stats.n_groups)
        c = controller.update(m)
        out["steps"].append(stats.step)
        per_axis = {
            "variance": _axes(tuple(stats.mean_within_variance()), k),
            "alpha": _axes(m.alpha, k),
            "growth": _axes(m.growth, k),
            "weights": _axes(c.weights if prior is None else _times(c.weights, prior), k),
        }
        for name, values in per_axis.items():
            for axis, v in enumerate(values):
                out[name][axis].append(v)
        for name, value in (
            ("drift", m.drift),
            ("threshold", c.threshold),
            ("beta", c.beta),
            ("clip_eps", c.clip_eps),
        ):
            out[name].append(_num(value))
        out["active"].append(c.active)
        out["corrections"].append(c.corrections)
        out["over_exploited"].append(m.over_exploited)
        out["n_responses"].append(stats.n_responses)
    out["baseline"] = None if monitor.state.baseline is None else _axes(monitor.state.baseline, k)
    return out


def _times(weights: tuple[float, ...], prior: tuple[float, ...]) -> tuple[float, ...]:
    """m in force with a prior: the controller's factor times the fixed one (as DriftLoop)."""
    return tuple(w * p for w, p in zip(weights, prior, strict=True))


def _samples(registry: CollectorRegistry, metric: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        if family.name == metric
        for s in family.samples
    ]


def metrics_summary(registry: CollectorRegistry) -> dict[str, Any]:
    """Cumulative load counters at one instant (`time`, Unix seconds).

    `requests`: inference requests answered so far (any status), `by_status`: the same by status
    class ("2xx", "4xx", "5xx"), 429 counted on its own and not in "4xx"; `batches` and
    `sequences`: forward passes and the sequences in them; `queue_depth`: sequences waiting
    now; `latency`: the end-to-end per-request histogram (`/score`, `/compare`) as cumulative
    `buckets` [[le, count]], with `count` and `sum`.
    """
    requests, by_status = 0.0, {"2xx": 0.0, "4xx": 0.0, "429": 0.0, "5xx": 0.0}
    for name, labels, value in _samples(registry, "gpm_requests"):
        if not name.endswith("_total") or labels.get("route") not in INFERENCE_ROUTES:
            continue
        requests += value
        status = labels.get("status", "")
        group = "429" if status == "429" else f"{status[:1]}xx"
        if group in by_status:
            by_status[group] += value
    buckets: list[list[float]] = []
    count = total = 0.0
    for name, labels, value in _samples(registry, "gpm_stage_seconds"):
        if labels.get("stage") != "total":
            continue
        if name.endswith("_bucket"):
            buckets.append([float(labels["le"]), value])
        elif name.endswith("_count"):
            count = value
        elif name.endswith("_sum"):
            total = value
    buckets.sort(key=lambda b: b[0])

    def value(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    return {
        "time": time.time(),
        "requests": requests,
        "by_status": by_status,
        "batches": value("gpm_batch_size_count"),
        "sequences": value("gpm_batch_size_sum"),
        "queue_depth": value("gpm_queue_depth"),
        "ready": value("gpm_ready") == 1.0,
        # JSON has no infinity: the +Inf bucket's bound is sent as null.
        "latency": {
            "buckets": [[_num(le), c] for le, c in buckets],
            "count": count,
            "sum": total,
        },
    }
