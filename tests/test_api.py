"""HTTP API through the real app (fake backend): every route and every error status."""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest
import torch
from apptools import serve
from fakes import FakeBackend

from gpm_server.deps import unless_disconnected

ONE_GROUP = {"groups": [{"prompt": "Say hi.", "responses": ["Hi!", "Hello there.", "Yo"]}]}
PAIR = {"prompt": "Say hi.", "a": "Hi!", "b": "Go away."}


def _error(resp, status: int, code: str, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code
    assert err["message"]
    if field is not None:
        assert err["field"] == field
    return err


# --- operational routes ----------------------------------------------------------------------


async def test_ops_routes() -> None:
    async with serve(FakeBackend(k=3), api_key="s3cret-key") as (_, client):
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/ready")).json() == {"ready": True, "status": "ready"}
        info = await client.get("/info")
        assert info.status_code == 200
        body = info.json()
        assert (body["model"], body["k"], body["tau"], body["gated"]) == ("fake-gpm", 3, 0.1, True)
        assert body["auth_required"] is True
        assert body["batching"]["max_batch_size"] == 64
        assert "s3cret-key" not in info.text
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert "cdn." not in docs.text  # offline: assets come from this service
        for page in (docs, await client.get("/redoc")):
            assets = re.findall(r'(?:src|href)="(/docs-static/[^"]+)"', page.text)
            assert assets
            for asset in assets:
                got = await client.get(asset)
                assert got.status_code == 200 and len(got.content) > 1000, asset
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"/score", "/compare", "/health", "/ready", "/info", "/metrics"} <= set(paths)
        _error(await client.get("/nope"), 404, "not_found")
        _error(await client.get("/score"), 405, "method_not_allowed")


async def test_metrics_count_requests_batches_and_errors() -> None:
    async with serve(FakeBackend(), max_groups_per_request=1) as (_, client):
        assert (await client.post("/score", json=ONE_GROUP)).status_code == 200
        two = {"groups": ONE_GROUP["groups"] * 2}
        assert (await client.post("/score", json=two)).status_code == 413
        text = (await client.get("/metrics")).text
    assert 'gpm_requests_total{route="/score",status="200"} 1.0' in text
    assert 'gpm_requests_total{route="/score",status="413"} 1.0' in text
    assert 'gpm_errors_total{reason="too_large"} 1.0' in text
    assert 'gpm_responses_scored_total{route="/score"} 3.0' in text
    for stage in ("queue", "tokenize", "forward", "total"):
        assert f'gpm_stage_seconds_count{{stage="{stage}"}}' in text
    assert "gpm_batch_size_bucket" in text and "gpm_queue_depth 0.0" in text
    assert 'gpm_batch_tokens_sum{kind="padded"}' in text


# --- /score and /compare on the fake -----------------------------------------------------------


async def test_score_shapes_and_values() -> None:
    backend = FakeBackend(k=2)
    req = {
        "groups": [
            {"prompt": "Say hi.", "responses": ["Hi!", "Hello there.", "Yo"], "id": "g0"},
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "?"},
                ],
                "responses": ["only one"],
            },
        ],
        "return_matrix": True,
    }
    async with serve(backend) as (_, client):
        resp = await client.post("/score", json=req)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["k"], body["tau"]) == ("fake-gpm", 2, 0.1)
    g0, g1 = body["groups"]
    assert g0["id"] == "g0" and g1["id"] is None
    seqs = backend.encode([("Say hi.", r) for r in req["groups"][0]["responses"]])
    for i, s in enumerate(seqs):
        assert g0["embeddings"][i] == pytest.approx(backend.embedding(s).tolist(), abs=1e-7)
    assert g0["eigenvalues"] == pytest.approx(backend.eigenvalues(seqs[0]).tolist(), abs=1e-7)
    assert len(g0["group_scores"]) == 3 and len(g0["group_scores"][0]) == 2
    assert len(g0["matrix"]) == 3 and all(len(row) == 3 for row in g0["matrix"])
    assert g0["truncated"] == [False] * 3
    assert g0["response_tokens"] == [s.response_tokens for s in seqs]
    # A single response has an embedding but no group score: null, never 0 or NaN.
    assert g1["group_scores"] == [[None, None]] and g1["rewards"] == [None]
    assert g1["matrix"] == [[0.5]]
    n_seq = 4
    all_seqs = seqs + backend.encode([(req["groups"][1]["prompt"], "only one")])
    assert body["usage"] == {
        "prompt_tokens": sum(s.prompt_len for s in all_seqs),
        "total_tokens": sum(s.cost for s in all_seqs),
        "sequences": n_seq,
    }


async def test_string_prompt_equals_one_user_message() -> None:
    chat = [{"role": "user", "content": "Say hi."}]
    async with serve(FakeBackend()) as (_, client):
        a = (await client.post("/score", json=ONE_GROUP)).json()
        b = (
            await client.post(
                "/score", json={"groups": [{**ONE_GROUP["groups"][0], "prompt": chat}]}
            )
        ).json()
    assert a["groups"] == b["groups"]


async def test_compare_single_and_many() -> None:
    async with serve(FakeBackend(k=3)) as (_, client):
        one = await client.post("/compare", json={**PAIR, "id": "p"})
        many = await client.post(
            "/compare", json={"pairs": [PAIR, {**PAIR, "a": "Go away.", "b": "Hi!"}]}
        )
    assert one.status_code == 200 and many.status_code == 200
    r = one.json()["results"][0]
    assert r["id"] == "p"
    assert sum(r["per_dimension"]) == pytest.approx(r["score"], abs=1e-6)
    assert r["prob_a_wins"] == pytest.approx(1 / (1 + math.exp(-r["score"] / 0.1)), abs=1e-6)
    ab, ba = many.json()["results"]
    assert ab["score"] == pytest.approx(r["score"], abs=1e-7)
    assert ba["score"] == pytest.approx(-ab["score"], abs=1e-6)
    assert ab["prob_a_wins"] + ba["prob_a_wins"] == pytest.approx(1.0, abs=1e-6)
    assert one.json()["usage"]["sequences"] == 2


# --- error statuses ----------------------------------------------------------------------------


async def test_401_on_inference_routes_only() -> None:
    async with serve(FakeBackend(), api_key="s3cret-key") as (_, client):
        for route, body in (("/score", ONE_GROUP), ("/compare", PAIR)):
            _error(await client.post(route, json=body), 401, "unauthorized")
            bad = {"Authorization": "Bearer wrong"}
            resp = await client.post(route, json=body, headers=bad)
            _error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"
            basic = {"Authorization": "Basic s3cret-key"}
            _error(await client.post(route, json=body, headers=basic), 401, "unauthorized")
            good = {"Authorization": "Bearer s3cret-key"}
            assert (await client.post(route, json=body, headers=good)).status_code == 200
        for route in ("/health", "/ready", "/info", "/metrics"):
            assert (await client.get(route)).status_code == 200


async def test_413_body_size_declared_and_streamed() -> None:
    big = {"groups": [{"prompt": "x", "responses": ["y" * 5000]}]}
    async with serve(FakeBackend(), max_body_bytes=4096) as (app, client):
        _error(await client.post("/score", json=big), 413, "body_too_large", "body")

        async def chunks():  # no Content-Length: the guard counts bytes as they arrive
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        resp = await client.post(
            "/score", content=chunks(), headers={"Content-Type": "application/json"}
        )
        _error(resp, 413, "body_too_large", "body")
        assert app.state.model.batches[1:] == []  # nothing after the warm-up reached the model
        assert (await client.post("/score", json=ONE_GROUP)).status_code == 200


async def test_413_for_each_count_limit_and_truncation_reject() -> None:
    backend = FakeBackend(max_length=40)
    limits = {"max_groups_per_request": 2, "max_responses_per_group": 3, "max_pairs_per_request": 1}
    async with serve(backend, truncation="reject", **limits) as (_, client):
        groups = {"groups": ONE_GROUP["groups"] * 3}
        _error(await client.post("/score", json=groups), 413, "too_large", "groups")
        four = {"groups": [{"prompt": "p", "responses": ["a", "b", "c", "d"]}]}
        _error(await client.post("/score", json=four), 413, "too_large", "groups.0.responses")
        pairs = {"pairs": [PAIR, PAIR]}
        _error(await client.post("/compare", json=pairs), 413, "too_large", "pairs")
        long = {"groups": [{"prompt": "p", "responses": ["ok", "z" * 100]}]}
        err = _error(await client.post("/score", json=long), 413, "sequence_too_long")
        assert err["field"] == "groups.0.responses.1"
        _error(
            await client.post("/compare", json={**PAIR, "b": "z" * 100}),
            413,
            "sequence_too_long",
            "b",
        )


async def test_truncation_right_flags_the_response() -> None:
    async with serve(FakeBackend(max_length=40), truncation="right") as (_, client):
        resp = await client.post(
            "/score", json={"groups": [{"prompt": "p", "responses": ["ok", "z" * 100]}]}
        )
    assert resp.status_code == 200
    assert resp.json()["groups"][0]["truncated"] == [False, True]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "groups"),
        ({"groups": []}, "groups"),
        ({"groups": [{"prompt": "p", "responses": []}]}, "groups.0.responses"),
        ({"groups": [{"prompt": "", "responses": ["r"]}]}, "groups.0.prompt"),
        ({"groups": [{"prompt": "p", "responses": ["r"]}], "run_id": "r"}, "body"),
        ({"groups": [{"prompt": 3, "responses": ["r"]}]}, "groups.0.prompt"),
        (
            {"groups": [{"prompt": [{"role": "robot", "content": "x"}], "responses": ["r"]}]},
            "groups.0.prompt.0.role",
        ),
        ({"groups": [{"prompt": [], "responses": ["r"]}]}, "groups.0.prompt"),
        ({"groups": [{"prompt": "p", "responses": [1]}]}, "groups.0.responses.0"),
        ({"groups": [{"prompt": "p", "responses": ["r"]}], "stepp": 1}, "stepp"),
        ({"groups": [{"prompt": "p", "responses": ["r"]}], "run_id": "r", "step": -1}, "step"),
        ({"groups": [{"prompt": "p", "responses": ["r"]}], "run_id": "r", "step": 1.5}, "step"),
    ],
)
async def test_422_names_the_field(body: dict, field: str) -> None:
    async with serve(FakeBackend()) as (_, client):
        _error(await client.post("/score", json=body), 422, "invalid_request", field)


async def test_422_nan_invalid_json_and_compare_forms() -> None:
    async with serve(FakeBackend()) as (_, client):
        nan = '{"groups": [{"prompt": "p", "responses": ["r"]}], "run_id": "r", "step": NaN}'
        headers = {"Content-Type": "application/json"}
        _error(
            await client.post("/score", content=nan, headers=headers),
            422,
            "invalid_request",
            "step",
        )
        _error(await client.post("/score", content="{", headers=headers), 422, "invalid_json")
        _error(
            await client.post("/compare", json={"prompt": "p", "a": "x"}), 422, "invalid_request"
        )
        both = {**PAIR, "pairs": [PAIR]}
        _error(await client.post("/compare", json=both), 422, "invalid_request")
        _error(
            await client.post("/compare", json={"pairs": [{"prompt": "p", "a": "x"}]}),
            422,
            "invalid_request",
            "pairs.0.b",
        )


async def test_429_when_the_queue_is_full() -> None:
    backend = FakeBackend()
    async with serve(backend, max_queue=2, max_wait_ms=0) as (app, client):
        backend.gate.clear()
        backend.entered.clear()
        blocker = asyncio.ensure_future(client.post("/score", json=ONE_GROUP))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        two = {"groups": [{"prompt": "p", "responses": ["a", "b"]}]}
        waiting = asyncio.ensure_future(client.post("/score", json=two))
        while app.state.batcher.depth < 2:
            await asyncio.sleep(0.005)
        resp = await client.post("/score", json=ONE_GROUP)
        _error(resp, 429, "queue_full")
        assert int(resp.headers["retry-after"]) >= 1
        backend.gate.set()
        assert (await blocker).status_code == 200
        assert (await waiting).status_code == 200


async def test_503_before_ready_then_200() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # the warm-up forward waits
    async with serve(backend, ready=False) as (_, client):
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        resp = await client.post("/score", json=ONE_GROUP)
        _error(resp, 503, "not_ready")
        assert "retry-after" in resp.headers
        _error(await client.post("/compare", json=PAIR), 503, "not_ready")
        backend.gate.set()
        from loopback import wait_ready_asgi

        await wait_ready_asgi(client)
        assert (await client.post("/score", json=ONE_GROUP)).status_code == 200


async def test_500_fails_only_the_bad_request() -> None:
    backend = FakeBackend(fail_marker="FAIL")
    async with serve(backend, max_wait_ms=50) as (_, client):
        bad = {"groups": [{"prompt": "p", "responses": ["FAIL now"]}]}
        good, failed = await asyncio.gather(
            client.post("/score", json=ONE_GROUP), client.post("/score", json=bad)
        )
    assert good.status_code == 200
    _error(failed, 500, "inference_failed")


# --- telemetry hook and disconnects --------------------------------------------------------------


class RecordingStore:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def record(self, **kwargs) -> None:
        if self.fail:
            raise OSError("disk full")
        self.calls.append(kwargs)


async def test_telemetry_hook_records_tagged_calls() -> None:
    store = RecordingStore()
    req = {
        "groups": [
            {"prompt": "p1", "responses": ["a", "bb", "ccc"]},
            {"prompt": "p2", "responses": ["only"]},
            {"prompt": "p3", "responses": ["x", "yy", "zzz"]},
        ],
        "run_id": "run-1",
        "step": 7,
    }
    async with serve(FakeBackend(k=2), telemetry=store) as (_, client):
        untagged = await client.post("/score", json={"groups": req["groups"]})
        assert untagged.status_code == 200 and store.calls == []
        resp = await client.post("/score", json=req)
    assert resp.status_code == 200
    (call,) = store.calls  # the one-response group has no group score: left out
    assert (call["run_id"], call["step"]) == ("run-1", 7)
    groups = resp.json()["groups"]
    kept = [groups[0], groups[2]]
    assert call["eigenvalues"].shape == (2, 2)
    assert call["group_scores"].shape == (2, 3, 2)
    assert call["response_tokens"].dtype == torch.int64
    assert call["response_tokens"].tolist() == [g["response_tokens"] for g in kept]
    torch.testing.assert_close(
        call["group_scores"], torch.tensor([g["group_scores"] for g in kept])
    )
    torch.testing.assert_close(call["eigenvalues"], torch.tensor([g["eigenvalues"] for g in kept]))


async def test_telemetry_failure_is_loud() -> None:
    req = {**ONE_GROUP, "run_id": "r", "step": 0}
    async with serve(FakeBackend(), telemetry=RecordingStore(fail=True)) as (_, client):
        _error(await client.post("/score", json=req), 500, "telemetry_failed")


class _GoneRequest:
    """A request whose client disconnects once `started` is set."""

    def __init__(self, started: asyncio.Event) -> None:
        self.started = started

    async def receive(self) -> dict:
        await self.started.wait()
        return {"type": "http.disconnect"}


async def test_client_disconnect_cancels_the_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    from gpm_server.errors import GPMError

    with pytest.raises(GPMError) as info:
        await unless_disconnected(_GoneRequest(started), work())  # type: ignore[arg-type]
    assert info.value.code == "client_gone"
    assert cancelled.is_set()


async def test_tagged_score_reaches_the_real_store() -> None:
    from gpm_server.telemetry_store import TelemetryStore

    store = TelemetryStore(":memory:")
    req = {**ONE_GROUP, "run_id": "run-x", "step": 3}
    async with serve(FakeBackend(k=2), telemetry=store) as (_, client):
        assert (await client.post("/score", json=req)).status_code == 200
        resp = await client.get("/telemetry", params={"run_id": "run-x"})
    assert resp.status_code == 200, resp.text
    (step,) = resp.json()["steps"]
    assert (step["step"], step["k"], step["n_responses"]) == (3, 2, 3)


async def test_load_failure_is_reported_and_fatal(tmp_path) -> None:
    import httpx

    from gpm_server.app import create_app
    from gpm_server.settings import Settings

    fatal: list[bool] = []
    settings = Settings(model=str(tmp_path / "no-such-model"), telemetry_db=":memory:")
    app = create_app(settings, on_fatal=lambda: fatal.append(True))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            while app.state.status == "loading":
                await asyncio.sleep(0.01)
            assert (await client.get("/ready")).json() == {"ready": False, "status": "failed"}
            assert (await client.get("/health")).status_code == 503
            _error(await client.post("/score", json=ONE_GROUP), 503, "model_load_failed")
    assert fatal == [True]


async def test_startup_objects_are_frozen_out_of_the_collector() -> None:
    """After start-up a full collection must not walk the model's and the libraries' objects
    (each one stalled the service for ~0.3 s, docs/reliability.md)."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        async with serve(FakeBackend()) as (_, client):
            assert (await client.get("/ready")).status_code == 200
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
