"""GPRL learner side: the HTTP client and the trainer adapters (the math is gprl_core's)."""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: `import gprl_client` must not import httpx (GPMClient) or anything heavy.
_EXPORTS = {
    "gprl_advantages": "gprl_core.advantages",
    "GPRLAdvantages": "gprl_core.advantages",
    "DriftConfig": "gprl_core.drift",
    "DriftMonitor": "gprl_core.drift",
    "DriftController": "gprl_core.drift",
    "NoOpDriftController": "gprl_core.drift",
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
