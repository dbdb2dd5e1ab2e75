"""Prometheus metrics (`gpm_` prefix, small fixed label sets), one registry per app instance.

A per-instance `CollectorRegistry` lets tests build many apps in one process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-export)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Fixed route labels: anything else is "other", so a scan of random URLs cannot blow up cardinality.
ROUTES = (
    "/score",
    "/compare",
    "/openrlhf/reward",
    "/get_reward",
    "/health",
    "/ready",
    "/info",
    "/metrics",
    "/telemetry",
    "/telemetry/runs",
    "/telemetry/drift",
    "/metrics/summary",
    "/dashboard",
)
STAGES = ("queue", "tokenize", "forward", "total")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class Metrics:
    """All service metrics; attributes are prometheus_client collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gpm_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.errors = Counter(
            "gpm_errors", "Error responses by reason code.", ["reason"], registry=r
        )
        self.queue_depth = Gauge("gpm_queue_depth", "Sequences waiting for the model.", registry=r)
        self.batch_size = Histogram(
            "gpm_batch_size", "Sequences per forward pass.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "gpm_batch_tokens",
            "Tokens per forward pass: padded (longest × count) and real (sum of lengths).",
            ["kind"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "gpm_stage_seconds",
            "Latency per stage: queue (wait for a batch), tokenize, forward (per batch), "
            "total (per request).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_failures = Counter(
            "gpm_batch_failures", "Forward passes that raised (before split-retry).", registry=r
        )
        self.responses_scored = Counter(
            "gpm_responses_scored", "Sequences scored, by route.", ["route"], registry=r
        )
        self.ready = Gauge("gpm_ready", "1 when the model is loaded and warmed up.", registry=r)
        for stage in STAGES:
            self.latency.labels(stage=stage)
        for kind in ("padded", "real"):
            self.batch_tokens.labels(kind=kind)

    def render(self) -> bytes:
        return generate_latest(self.registry)
