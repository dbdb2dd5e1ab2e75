"""`create_app(settings, model=None)`: the verifier service as a FastAPI app.

The model is loaded (when not given) and warmed up in the background after startup, so /health
answers at once and /ready turns 200 only when a forward pass has run. Shutdown (SIGTERM through
uvicorn) stops new work, lets accepted requests finish (`drain_timeout_s`), then stops the model
thread.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpm_server import routes_inference, routes_openrlhf, routes_ops, routes_telemetry
from gpm_server.batcher import MicroBatcher
from gpm_server.errors import GPMError, install_error_handlers, to_response
from gpm_server.metrics import Metrics, route_label
from gpm_server.offline_docs import docs_kwargs, install_offline_docs
from gpm_server.protocol import GPMBackend, as_messages
from gpm_server.routes_dashboard import install_dashboard
from gpm_server.service import Scorer
from gpm_server.settings import Settings
from gpm_server.telemetry_store import TelemetryStore

log = logging.getLogger(__name__)


class ModelNotConfigured(RuntimeError):
    """No model was given and this build has no embedded default model."""


def default_model_path() -> str:
    """The embedded default model's path (module `gpm_server.default_model`, when shipped)."""
    try:
        module = importlib.import_module("gpm_server.default_model")
    except ModuleNotFoundError as exc:
        if exc.name not in ("gpm_server.default_model", "gpm_server"):
            raise
        raise ModelNotConfigured(
            "no model given and this build has no embedded default model: "
            "pass --model PATH_OR_HUB_ID (or set GPM_MODEL)"
        ) from exc
    return str(module.default_model_path())


def load_backend(settings: Settings) -> GPMBackend:
    """Load the configured GPM (blocking: call it in a thread)."""
    from gpm_server.model import GPM  # heavy import, only when a real model is needed

    path = settings.model or default_model_path()
    return GPM.from_pretrained(
        path,
        tau=settings.tau,
        l2_normalize=settings.l2_normalize,
        device=settings.resolved_device(),
        dtype=settings.resolved_dtype(),
        max_length=settings.max_length,
        revision=settings.revision,
    )


def _warm_up(model: GPMBackend) -> None:
    model.forward(model.encode([(as_messages("Hello!"), "Hi, how can I help?")]))


def freeze_startup_objects() -> None:
    """Move everything alive after start-up out of the garbage collector's reach.

    torch, transformers and their imports leave ~500k tracked objects; every full collection
    walks them all, ~280 ms on the 2-core dev machine, with the GIL held: the event loop and
    the model thread stall together (the 10-minute soak showed a p99 spike every ~80 s).
    None of them is garbage, and `gc.freeze()` exempts them from collection.
    """
    gc.collect()
    gc.freeze()


async def _start_model(app: FastAPI) -> None:
    """Load (unless given), start the batcher, warm up, then mark the app ready."""
    state = app.state
    settings: Settings = state.settings
    try:
        if state.model is None:
            started = time.perf_counter()
            state.model = await asyncio.to_thread(load_backend, settings)
            log.info("model loaded in %.1f s", time.perf_counter() - started)
        model: GPMBackend = state.model
        batcher = MicroBatcher(
            model,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            metrics=state.metrics,
            flush_when_idle=True,  # a lone request pays no max_wait (docs/performance.md)
            workers=settings.model_workers,
        )
        batcher.start()
        state.batcher = batcher
        state.status = "warming_up"
        await batcher.call_in_model_thread(_warm_up, model)
        freeze_startup_objects()
        state.scorer = Scorer(model, batcher, settings, state.metrics)
        state.status = "ready"
        state.metrics.ready.set(1)
        i = model.info
        log.info(
            "ready: model=%s k=%d tau=%g gated=%s device=%s",
            i.model_id,
            i.k,
            i.tau,
            i.gated,
            i.device,
        )
    except Exception:
        log.exception("model failed to load or warm up")
        state.status = "failed"
        if state.on_fatal is not None:
            state.on_fatal()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    loader = asyncio.create_task(_start_model(app), name="gpm-load")
    try:
        yield
    finally:
        if app.state.status != "failed":
            app.state.status = "draining"
        app.state.metrics.ready.set(0)
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        batcher: MicroBatcher | None = app.state.batcher
        if batcher is not None:
            if not await batcher.drain(app.state.settings.drain_timeout_s):
                log.warning("drain timed out; failing %d queued sequences", batcher.depth)
            await batcher.close()
        telemetry = app.state.telemetry
        if telemetry is not None and hasattr(telemetry, "close"):
            telemetry.close()


class BodyLimit:
    """Reject bodies over `max_bytes` with 413 before anything parses them (ASGI middleware).

    Reads the body up front (at most `max_bytes`), then replays it to the app; later receive
    calls pass through, so disconnects still reach the routes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(int(declared), scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(size, scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        err = GPMError(
            413, "body_too_large", f"request body is over the limit of {self.max_bytes} bytes"
        )
        err.field = "body"
        self.metrics.errors.labels(reason=err.code).inc()
        await to_response(err)(scope, receive, send)


class AdmissionLimit:
    """At most `limit` inference requests (POST) in progress; the next gets 429 at once.

    The model queue's bound (`max_queue`) only sees requests that have been parsed and
    tokenized; when requests arrive faster than the process can parse them, they would pile up
    in front of it without bound. Rejecting before the body is read keeps shedding cheap.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            err = GPMError(
                429,
                "too_many_requests",
                f"{self.in_flight} requests are in progress (limit {self.limit}); retry later",
                headers={"Retry-After": "1"},
            )
            self.metrics.errors.labels(reason=err.code).inc()
            await to_response(err)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class RequestMetrics:
    """Count requests by route and status; time inference routes end to end (ASGI middleware)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_label(scope["path"])
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            if route in ("/score", "/compare"):
                total = time.perf_counter() - started
                self.metrics.latency.labels(stage="total").observe(total)


def create_app(
    settings: Settings,
    model: GPMBackend | None = None,
    on_fatal: Callable[[], Any] | None = None,
) -> FastAPI:
    """Build the service. `model`: a ready backend (tests, embedding); None loads `settings.model`.

    `on_fatal` is called when the model fails to load (the CLI uses it to exit non-zero).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("gprl")
    except PackageNotFoundError:
        app_version = "0+unknown"
    app = FastAPI(
        title="GPM verifier",
        version=app_version,
        summary="General Preference Model scoring for RL: groups, pairs, drift telemetry.",
        lifespan=_lifespan,
        **docs_kwargs(),
    )
    install_offline_docs(app)  # /docs and /redoc without a CDN
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.model = model
    app.state.batcher = None
    app.state.scorer = None
    app.state.status = "loading"
    app.state.on_fatal = on_fatal
    app.state.version = app_version
    # Drift telemetry of /score calls with run_id + step (SQLite; closed in the lifespan).
    app.state.telemetry = TelemetryStore(settings.telemetry_db)
    install_error_handlers(app)
    app.include_router(routes_ops.router)
    app.include_router(routes_inference.router)
    # --- extra routers (telemetry, OpenRLHF reward route) are included here ---------------
    app.include_router(routes_openrlhf.router)
    app.include_router(routes_telemetry.router)
    install_dashboard(app)  # GET /dashboard and its bundled assets (no CDN)
    # The outermost middleware is added last: metrics see every response, 413s included.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(AdmissionLimit, limit=settings.max_in_flight, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
