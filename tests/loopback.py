"""Test helpers for real loopback HTTP: free ports, waiting until a server is ready, serving an
ASGI app in a thread, and injecting transient faults. The one home of these helpers in tests/.

Imported by bare name (`import loopback`); there is no tests package.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    """A loopback port that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def wait_ready(
    url: str,
    proc: subprocess.Popen | None = None,
    timeout_s: float = 120.0,
    interval_s: float = 0.1,
    log: Path | None = None,
) -> None:
    """Poll `url/ready` until it answers 200. Fails at once when `proc` exits (with the text of
    `log`, if given); `timeout_s` only bounds a hang (a cold start imports torch)."""
    deadline = time.monotonic() + timeout_s

    def failure(why: str) -> AssertionError:
        tail = f"\n{log.read_text(errors='replace')[-4000:]}" if log and log.exists() else ""
        return AssertionError(f"{url}: {why}{tail}")

    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise failure(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(interval_s)
    raise failure(f"/ready did not answer 200 within {timeout_s} s")


async def wait_ready_asgi(client: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
    """`wait_ready` for an app called in-process (httpx over ASGI, no socket)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await client.get("/ready")).status_code != 200:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the app did not become ready")
        await asyncio.sleep(0.01)


@contextmanager
def serve(app: Any, timeout: float = 30.0, ready: bool = False) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; yields its base URL (once `/ready`
    answers 200, with `ready`)."""
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
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(url, timeout_s=120.0, interval_s=0.05)
        yield url
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
