"""Test helpers: serve an ASGI app over real loopback HTTP, and inject transient faults.

Imported by bare name (`import loopback`); there is no tests package.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def make_app(tmp_path: Any, name: str = "a", backend: Any = None, **settings: Any) -> Any:
    """The real service app on a fake K=3 backend, telemetry in `tmp_path/<name>.sqlite3`."""
    from fakes import FakeBackend

    from gpm_server.app import create_app
    from gpm_server.settings import Settings

    db = tmp_path / f"{name}.sqlite3"
    return create_app(Settings(telemetry_db=db, **settings), model=backend or FakeBackend(k=3))


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FaultInjector:
    """ASGI middleware: the first `len(statuses)` requests to `path` get those error statuses
    (forever when `forever`); everything else, lifespan included, goes to the wrapped app."""

    def __init__(
        self,
        app: Any,
        statuses: list[int],
        path: str = "/score",
        retry_after: str | None = None,
        forever: bool = False,
    ) -> None:
        self.app = app
        self.statuses = list(statuses)
        self.path = path
        self.retry_after = retry_after
        self.forever = forever
        self.injected = 0
        self.passed = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if not self.statuses:
            self.passed += 1
            await self.app(scope, receive, send)
            return
        status = self.statuses[0] if self.forever else self.statuses.pop(0)
        self.injected += 1
        message = await receive()  # drain the body so the connection can be reused
        while message.get("more_body"):
            message = await receive()
        body = json.dumps({"error": {"code": "injected", "message": f"fault {status}"}}).encode()
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
