"""Run the real app in-process for tests: lifespan started, httpx over ASGI, wait for /ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from gpm_server.app import create_app
from gpm_server.protocol import GPMBackend
from gpm_server.settings import Settings


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await client.get("/ready")).status_code != 200:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the app did not become ready")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def serve(
    backend: GPMBackend,
    ready: bool = True,
    telemetry: Any = None,
    headers: dict[str, str] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app around `backend` with `Settings(**settings)`; yields `(app, client)`."""
    settings.setdefault("telemetry_db", ":memory:")
    app = create_app(Settings(**settings), model=backend)
    if app.state.telemetry is not None:
        app.state.telemetry.close()
    app.state.telemetry = telemetry  # None: no recording; tests pass a stub or a real store
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gpm.test", headers=headers
        ) as client:
            if ready:
                await wait_ready(client)
            yield app, client
