"""Run the real app in-process for tests: lifespan started, httpx over ASGI, wait for /ready."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from loopback import wait_ready_asgi

from gpm_server.app import create_app
from gpm_server.protocol import GPMBackend
from gpm_server.settings import Settings


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
                await wait_ready_asgi(client)
            yield app, client
