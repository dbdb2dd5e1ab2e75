"""Security: the API key guards every inference and telemetry route, is compared in constant time,
never reaches a log or /info, and telemetry of a run cannot be written without it.

Trust model (docs/reliability.md): one shared key per service. With a key set, every write
(`/score` with `run_id`, which feeds telemetry) and every read of telemetry needs it; any key
holder may write to any run (no per-run authorisation). Without a key the service trusts its
network: anyone who reaches it can write any run's telemetry.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import loopback
import pytest
import uvicorn
from apptools import serve
from fakes import FakeBackend

from gpm_server import deps
from gpm_server.app import create_app
from gpm_server.settings import Settings
from gpm_server.telemetry_store import TelemetryStore

KEY = "k3y-SECRET-7f1e9a"
MARKER = "ZQXJ-marker-4821"  # a string no log line, path or model output contains by chance
# /metrics/summary: the same counters as /metrics, as JSON (the dashboard's load panel).
OPEN = {
    "/health",
    "/ready",
    "/info",
    "/metrics",
    "/metrics/summary",
    "/openapi.json",
    "/docs",
    "/redoc",
}
BODIES = {
    "/score": {"groups": [{"prompt": "p", "responses": ["a", "b"]}], "run_id": "r", "step": 0},
    "/compare": {"prompt": "p", "a": "x", "b": "y"},
    "/openrlhf/reward": {"query": ["<|im_start|>user\nhi<|im_end|>\nok"], "prompts": ["hi"]},
    "/get_reward": {"query": ["hello"]},
}
BAD_AUTH = [
    {},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
    {"X-API-Key": KEY},
]


def _guarded_operations(app) -> list[tuple[str, str]]:
    """Every (method, path) of the app's schema except the documented open ones."""
    ops = []
    for path, item in app.openapi()["paths"].items():
        if path not in OPEN:
            ops += [(method.upper(), path) for method in item]
    return ops


async def _call(client: httpx.AsyncClient, method: str, path: str, headers: dict) -> httpx.Response:
    if method == "GET":
        return await client.get(path, params={"run_id": "r"}, headers=headers)
    return await client.post(path, json=BODIES[path], headers=headers)


async def test_every_inference_and_telemetry_route_needs_the_key() -> None:
    async with serve(FakeBackend(k=3), api_key=KEY, telemetry=TelemetryStore(":memory:")) as (
        app,
        client,
    ):
        ops = _guarded_operations(app)
        paths = {p for _, p in ops}
        # New routes join this test automatically; these must be among them.
        assert {"/score", "/compare", "/telemetry", "/telemetry/runs", "/get_reward"} <= paths
        for method, path in ops:
            for headers in BAD_AUTH:
                resp = await _call(client, method, path, headers)
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.json()["error"]["code"] == "unauthorized"
                assert resp.headers["www-authenticate"] == "Bearer"
            good = {"Authorization": f"Bearer {KEY}"}
            resp = await _call(client, method, path, good)
            assert resp.status_code == 200, (method, path, resp.text)
        for path in ("/health", "/ready"):
            assert (await client.get(path)).status_code == 200


async def test_unauthorised_requests_never_reach_the_model() -> None:
    backend = FakeBackend()
    async with serve(backend, api_key=KEY) as (_, client):
        warmup = len(backend.batches)
        for headers in BAD_AUTH:
            await client.post("/score", json=BODIES["/score"], headers=headers)
        assert len(backend.batches) == warmup


async def test_the_key_is_compared_with_hmac_compare_digest(monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = deps.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    async with serve(FakeBackend(), api_key=KEY) as (_, client):
        ok = await client.post(
            "/compare", json=BODIES["/compare"], headers={"Authorization": f"Bearer {KEY}"}
        )
        bad = await client.post(
            "/compare", json=BODIES["/compare"], headers={"Authorization": "Bearer nope"}
        )
    assert (ok.status_code, bad.status_code) == (200, 401)
    assert calls == [(KEY.encode(), KEY.encode()), (b"nope", KEY.encode())]


async def test_info_metrics_and_schema_reveal_no_secret() -> None:
    async with serve(FakeBackend(), api_key=KEY) as (_, client):
        auth = {"Authorization": f"Bearer {KEY}"}
        await client.post("/score", json=BODIES["/score"], headers=auth)
        info = await client.get("/info")
        assert info.status_code == 200 and info.json()["auth_required"] is True
        for path in ("/info", "/metrics", "/openapi.json", "/health", "/ready"):
            text = (await client.get(path)).text
            assert KEY not in text, path
    assert KEY not in repr(Settings(api_key=KEY)) and KEY not in str(Settings(api_key=KEY))


def _records(store: TelemetryStore, run_id: str) -> int:
    return sum(r["records"] for r in store.list_runs() if r["run_id"] == run_id)


async def test_telemetry_of_a_run_is_not_writable_without_the_key() -> None:
    store = TelemetryStore(":memory:")
    auth = {"Authorization": f"Bearer {KEY}"}
    victim = {**BODIES["/score"], "run_id": "victim", "step": 3}
    async with serve(FakeBackend(k=3), api_key=KEY, telemetry=store) as (_, client):
        assert (await client.post("/score", json=victim, headers=auth)).status_code == 200
        before = store.query("victim").to_dict()
        for headers in BAD_AUTH:
            for key in ("", "owner-key"):
                h = {**headers, "Idempotency-Key": key} if key else headers
                resp = await client.post("/score", json={**victim, "step": 4}, headers=h)
                assert resp.status_code == 401
        assert store.query("victim").to_dict() == before
        assert _records(store, "victim") == 1
        # The documented model: any key holder may write any run.
        other = {**victim, "run_id": "other"}
        assert (await client.post("/score", json=other, headers=auth)).status_code == 200
        assert _records(store, "other") == 1 and _records(store, "victim") == 1


async def test_idempotency_keys_of_one_run_do_not_suppress_another() -> None:
    store = TelemetryStore(":memory:")
    async with serve(FakeBackend(k=3), telemetry=store) as (_, client):
        for run in ("a", "b", "a"):
            body = {**BODIES["/score"], "run_id": run}
            resp = await client.post("/score", json=body, headers={"Idempotency-Key": "same"})
            assert resp.status_code == 200
        assert (_records(store, "a"), _records(store, "b")) == (1, 1)


# --- logs --------------------------------------------------------------------------------------


@pytest.fixture
def info_server(tmp_path, tiny_gpm):
    """The app on the tiny real model under uvicorn, logging at INFO like `gpm-server serve`."""
    settings = Settings(api_key=KEY, telemetry_db=tmp_path / "t.sqlite3", log_level="info")
    app = create_app(settings, model=tiny_gpm)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="info")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    loopback.wait_ready(url, timeout_s=120, interval_s=0.05)
    yield url
    server.should_exit = True
    thread.join(60)


def test_key_and_request_texts_never_reach_the_logs_at_info(info_server, caplog) -> None:
    url = info_server
    caplog.set_level(logging.INFO)
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = [{"role": "system", "content": f"sys {MARKER}"}, {"role": "user", "content": MARKER}]
    requests = [
        ("/score", {"groups": [{"prompt": MARKER, "responses": [MARKER, f"x{MARKER}"]}]}),
        (
            "/score",
            {"groups": [{"prompt": chat, "responses": ["a", MARKER]}], "run_id": "r", "step": 0},
        ),
        ("/compare", {"prompt": MARKER, "a": MARKER, "b": "b"}),
        ("/get_reward", {"query": [f"{MARKER} answer {MARKER}"], "prompts": [MARKER]}),
        (
            "/score",
            {"groups": [{"prompt": [{"role": "robot", "content": MARKER}], "responses": ["a"]}]},
        ),
        ("/score", {"groups": [{"prompt": "p", "responses": [MARKER]}], "extra": MARKER}),
        ("/compare", {"prompt": "p", "a": MARKER}),
    ]
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for path, body in requests:
            statuses.append(client.post(path, json=body, headers=auth).status_code)
        wrong = {"Authorization": f"Bearer {MARKER}"}
        statuses.append(client.post("/score", json=requests[0][1], headers=wrong).status_code)
        statuses.append(client.post("/score", content=f'{{"{MARKER}', headers=auth).status_code)
    assert statuses == [200, 200, 200, 200, 422, 422, 422, 401, 422]
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert any(r.name.startswith("uvicorn") for r in caplog.records)  # logging was captured
    assert KEY not in logged
    assert MARKER not in logged
