"""OpenRLHF's local reward function: `--reward.remote_url /path/to/this_file.py`.

OpenRLHF 0.11.2 loads `reward_func(queries, prompts, labels)` from a `.py` path and calls it in a
thread, one response at a time. This one forwards the call to the GPM service's
`/openrlhf/reward` route, which does all the work (response recovery, the reference label,
scalars for one query, `gpm_emb_*`/`gpm_eig_*` extra_logs: see gpm_server/routes_openrlhf.py),
so the answer is the same as with `--reward.remote_url http://HOST:PORT/openrlhf/reward`.
Use the file form when the rollout workers should reach the service through a client with
retries and an API key, configured by environment variables (set them in the Ray runtime env):

    GPRL_GPM_URL       base URL(s) of the service, comma-separated (default http://127.0.0.1:8000)
    GPRL_GPM_API_KEY   Bearer key, if the service has one
    GPRL_GPM_TIMEOUT   seconds per attempt (default 120); 4 retries with backoff on connection
                       errors, 429, 502, 503 (scoring is a pure function, so retrying is safe)
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import httpx

_RETRY_STATUS = {429, 502, 503}
_client: httpx.Client | None = None
_urls = itertools.count()


def _http() -> httpx.Client:
    global _client
    if _client is None:
        key = os.environ.get("GPRL_GPM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = float(os.environ.get("GPRL_GPM_TIMEOUT", "120"))
        _client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))
    return _client


def reset() -> None:
    """Forget the HTTP client (after changing the environment variables)."""
    global _client
    if _client is not None:
        _client.close()
    _client = None


def reward_func(
    queries: list[str], prompts: list[str], labels: list[Any], retries: int = 4
) -> dict[str, Any]:
    """OpenRLHF's `reward_func`: `{"rewards", "scores", "extra_logs"}` for these queries
    (scalars when one query is given, lists otherwise). Raises after the last retry: OpenRLHF
    logs the error and the sample gets no reward, which is louder than a made-up number."""
    urls = os.environ.get("GPRL_GPM_URL", "http://127.0.0.1:8000").split(",")
    body = {"query": list(queries), "prompts": list(prompts), "labels": list(labels)}
    error: str = ""
    for attempt in range(retries + 1):
        url = urls[next(_urls) % len(urls)].rstrip("/") + "/openrlhf/reward"
        try:
            response = _http().post(url, json=body)
            if response.status_code not in _RETRY_STATUS:
                response.raise_for_status()
                return response.json()
            error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempt < retries:
            time.sleep(min(0.5 * 2**attempt, 20.0))
    raise RuntimeError(f"GPM service unavailable after {retries + 1} attempts: {error}")
