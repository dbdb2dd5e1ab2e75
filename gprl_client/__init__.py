"""GPRL learner side: GPM score math, GPRL advantages, drift control, the HTTP client."""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: `import gprl_client` must not import httpx (GPMClient) or anything heavy.
_EXPORTS = {
    "gprl_advantages": "gprl_client.advantages",
    "GPRLAdvantages": "gprl_client.advantages",
    "DriftConfig": "gprl_client.drift",
    "DriftMonitor": "gprl_client.drift",
    "DriftController": "gprl_client.drift",
    "NoOpDriftController": "gprl_client.drift",
    "GPMClient": "gprl_client.client",
    "AsyncGPMClient": "gprl_client.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gprl_client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
