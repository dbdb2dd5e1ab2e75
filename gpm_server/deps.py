"""Route dependencies shared by every inference router: API key, readiness, client disconnects.

Other routers (telemetry, the OpenRLHF reward route) use `INFERENCE_DEPS` so that every
inference route is guarded the same way.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Depends, Request

from gpm_server.errors import GPMError, client_gone, draining, not_ready, unauthorized

T = TypeVar("T")


async def require_api_key(request: Request) -> None:
    """401 unless `Authorization: Bearer <key>` matches the configured key (when one is set)."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise unauthorized()


async def require_ready(request: Request) -> None:
    """503 until the model is loaded and warmed up, and again while draining."""
    status = request.app.state.status
    if status == "ready":
        return
    if status == "draining":
        raise draining()
    if status == "failed":
        raise GPMError(503, "model_load_failed", "the model failed to load; see the server log")
    raise not_ready()


# async: FastAPI runs a plain `def` dependency in a worker thread, two thread hops per request.
INFERENCE_DEPS = [Depends(require_api_key), Depends(require_ready)]


async def _wait_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect (or nothing
    # until the response is sent, when this watcher is cancelled).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and its queued sequences) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise client_gone()
