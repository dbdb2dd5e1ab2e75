"""GPMClient / AsyncGPMClient: pure retry decisions, then the real app over loopback HTTP.

Faults are injected by an ASGI middleware in front of the real app (tests/loopback.py); delays
are checked by recording what the client asks to sleep, never by the wall clock.
"""

from __future__ import annotations

import email.utils
import logging
import random

import httpx
import loopback
import pytest
import torch

from gprl_client import AsyncGPMClient, GPMClient
from gprl_client.client_core import (
    GPMRequestError,
    GPMUnavailableError,
    RetryPolicy,
    normalize_group,
    parse_retry_after,
)

GROUPS = [
    {"prompt": "Why is the sky blue?", "responses": ["Rayleigh scattering.", "No idea.", "Blue!"]},
    ("Write a haiku.", ["Waves fold into foam", "The sea is wet."]),
    {"prompt": [{"role": "user", "content": "2 + 2?"}], "responses": ["4", "5", "four", "22"]},
]


# --- pure decisions ----------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-2") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)


def test_backoff_grows_is_jittered_and_bounded() -> None:
    policy = RetryPolicy(max_retries=8, backoff=0.5, max_backoff=4.0, max_retry_after=10.0)
    rng = random.Random(0)
    for attempt in range(8):
        base = min(4.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, None, rng) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 1  # jittered
    waits = [policy.delay(0, 4.0, rng) for _ in range(200)]
    assert all(4.0 <= w <= 6.0 for w in waits)  # Retry-After is a floor, plus up to 50%
    assert max(waits) - min(waits) > 1.0  # spread out: shed clients do not return in one wave
    assert policy.delay(0, 99.0, rng) == 10.0  # ... within the cap
    exact = RetryPolicy(retry_after_jitter=0.0)
    assert exact.delay(0, 7.0, rng) == 7.0
    with pytest.raises(ValueError):
        RetryPolicy(retry_after_jitter=-1.0)


def test_group_validation() -> None:
    assert normalize_group(("p", ["a"])) == {"prompt": "p", "responses": ["a"]}
    assert normalize_group({"prompt": "p", "responses": ["a"], "id": 3})["id"] == "3"
    with pytest.raises(ValueError):
        normalize_group(("p", []))
    with pytest.raises(ValueError):
        GPMClient("http://127.0.0.1:1").score(GROUPS, run_id="r")  # step missing


# --- over loopback -----------------------------------------------------------------------------


_app = loopback.make_app


@pytest.fixture
def server(tmp_path):
    with loopback.serve(_app(tmp_path)) as url:
        yield url


def _client(urls, **kwargs) -> tuple[GPMClient, list[float]]:
    """A client whose sleeps are recorded, not slept."""
    client = GPMClient(urls, seed=0, **kwargs)
    slept: list[float] = []
    client._sleep = slept.append
    client.wait_ready(timeout=30, interval=0.05)
    return client, slept


def _raw_score(url: str, groups: list, **extra) -> dict:
    items = [normalize_group(g) for g in groups]
    resp = httpx.post(url + "/score", json={"groups": items, **extra}, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _nan_list(values: list) -> torch.Tensor:
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in values])


def test_score_tensors_equal_server_json(server) -> None:
    client, slept = _client(server, max_groups_per_request=2)
    res = client.score(GROUPS, return_matrix=True)
    raw = _raw_score(server, GROUPS, return_matrix=True)
    assert res.k == raw["k"] == 3 and res.model == "fake-gpm" and slept == []
    assert res.embeddings.shape == (3, 4, 6) and res.group_scores.shape == (3, 4, 3)
    assert not res.failed.any() and res.num_failed == 0
    for n, grp in enumerate(raw["groups"]):
        g = len(grp["embeddings"])
        assert torch.equal(res.embeddings[n, :g], torch.tensor(grp["embeddings"]))
        assert torch.equal(res.eigenvalues[n], torch.tensor(grp["eigenvalues"]))
        assert torch.equal(res.group_scores[n, :g], _nan_list(grp["group_scores"]))
        assert torch.equal(res.rewards[n, :g], torch.tensor(grp["rewards"]))
        assert torch.equal(res.matrix[n, :g, :g], torch.tensor(grp["matrix"]))
        assert res.response_tokens[n, :g].tolist() == grp["response_tokens"]
        assert res.valid[n].tolist() == [True] * g + [False] * (4 - g)
        assert torch.isnan(res.embeddings[n, g:]).all()  # padding is NaN, never 0
    assert res.usage["sequences"] == 9
    assert client.info()["k"] == 3
    client.close()


def test_transient_503_and_429_are_retried(tmp_path) -> None:
    faults = loopback.FaultInjector(_app(tmp_path), [503, 429], retry_after="0")
    with loopback.serve(faults) as url:
        client, slept = _client(url)
        res = client.score(GROUPS)
    assert faults.injected == 2 and faults.passed == 1
    assert not res.failed.any() and torch.isfinite(res.embeddings[0, :3]).all()
    assert slept == [0.0, 0.0] and client.retries == 2 and client.failures == 0


def test_retry_after_sets_the_delay(tmp_path) -> None:
    faults = loopback.FaultInjector(_app(tmp_path), [503, 502], retry_after="7")
    with loopback.serve(faults) as url:
        client, slept = _client(url, backoff=0.5)
        client.score(GROUPS[:1])
    assert len(slept) == 2 and all(7.0 <= s <= 10.5 for s in slept)  # floor + up to 50%
    faults = loopback.FaultInjector(_app(tmp_path, "b"), [504, 504])  # no Retry-After: backoff
    with loopback.serve(faults) as url:
        client, slept = _client(url, backoff=0.5)
        client.score(GROUPS[:1])
    assert 0.25 <= slept[0] <= 0.5 and 0.5 <= slept[1] <= 1.0


def test_a_server_that_never_recovers_gives_counted_logged_nan(tmp_path, caplog) -> None:
    faults = loopback.FaultInjector(_app(tmp_path), [503], forever=True)
    with loopback.serve(faults) as url:
        client, slept = _client(url, max_retries=2, k=3)
        with caplog.at_level(logging.WARNING, logger="gprl_client.client"):
            res = client.score(GROUPS)
        assert faults.injected == 3 and len(slept) == 2
        assert res.failed.tolist() == [True, True, True] and client.failures == 3
        assert torch.isnan(res.embeddings).all() and torch.isnan(res.rewards).all()
        assert not res.valid.any()
        assert all("503" in e for e in res.errors)
        assert any(
            "could not be scored" in r.message and "503" in r.message for r in caplog.records
        )

        strict, _ = _client(url, max_retries=1, raise_on_failure=True)
        with pytest.raises(GPMUnavailableError, match="503"):
            strict.score(GROUPS)
        assert strict.failures == 3  # counted even when raising


def test_only_the_failing_chunk_is_nan(tmp_path) -> None:
    faults = loopback.FaultInjector(_app(tmp_path), [503, 503])
    with loopback.serve(faults) as url:
        client, _ = _client(url, max_retries=1, max_groups_per_request=2)
        res = client.score(GROUPS)
    assert res.failed.tolist() == [True, True, False] and client.failures == 2
    assert torch.isfinite(res.embeddings[2]).all()


def test_no_retry_on_422(server) -> None:
    client, slept = _client(server)
    bad = [{"prompt": [{"role": "robot", "content": "hi"}], "responses": ["a", "b"]}]
    with pytest.raises(GPMRequestError) as info:
        client.score(bad)
    assert info.value.status == 422 and "groups.0.prompt" in str(info.value)
    assert slept == [] and client.retries == 0 and client.failures == 0


def test_api_key(tmp_path) -> None:
    with loopback.serve(_app(tmp_path, api_key="s3cret")) as url:
        anonymous, slept = _client(url)
        with pytest.raises(GPMRequestError) as info:
            anonymous.score(GROUPS)
        assert info.value.status == 401 and slept == []
        with pytest.raises(GPMRequestError):
            anonymous.telemetry("r")
        keyed, _ = _client(url, api_key="s3cret")
        assert not keyed.score(GROUPS, run_id="r", step=0).failed.any()
        assert sorted(keyed.telemetry("r").steps) == [0]


def test_failover_to_the_next_url(server) -> None:
    dead = loopback.dead_url()
    client, slept = _client([dead, server])
    for _ in range(3):  # whichever URL round robin starts at, every call succeeds
        assert not client.score(GROUPS).failed.any()
    assert client.failures == 0 and 1 <= len(slept) <= 2


def test_wait_ready_times_out_on_a_dead_url() -> None:
    client = GPMClient(loopback.dead_url())
    with pytest.raises(TimeoutError):
        client.wait_ready(timeout=0.2, interval=0.05)
    client.close()


async def test_async_client_matches_sync(tmp_path) -> None:
    faults = loopback.FaultInjector(_app(tmp_path), [503], retry_after="0")
    with loopback.serve(faults) as url:
        slept: list[float] = []

        async def record(delay: float) -> None:
            slept.append(delay)

        async with AsyncGPMClient([loopback.dead_url(), url], max_groups_per_request=1) as client:
            client._sleep = record
            await client.wait_ready(timeout=30, interval=0.05)
            res = await client.score(GROUPS, run_id="r", step=1)
            info = await client.info()
        sync, _ = _client(url)
        ref = sync.score(GROUPS)
    assert info["k"] == 3
    assert not res.failed.any() and client.failures == 0 and len(slept) >= 1
    assert torch.equal(res.embeddings.nan_to_num(7.0), ref.embeddings.nan_to_num(7.0))
    assert torch.equal(res.group_scores.nan_to_num(7.0), ref.group_scores.nan_to_num(7.0))


def test_telemetry_needs_every_url(server) -> None:
    client, _ = _client([server, loopback.dead_url()], max_retries=1)
    client.score(GROUPS, run_id="r", step=0)
    with pytest.raises(GPMUnavailableError):
        client.telemetry("r")  # partial telemetry would bias the drift monitor silently


def test_importing_the_package_does_not_import_httpx() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gprl_client, gprl_client.telemetry; "
        "assert 'httpx' not in sys.modules, 'httpx imported'; "
        "from gprl_client import GPMClient, AsyncGPMClient; assert 'httpx' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_equals_server_json(server) -> None:
    client, _ = _client(server, max_groups_per_request=1)
    pairs = [("Why?", "Because.", "No."), {"prompt": "Hi", "a": "Hello!", "b": "Go away.", "id": 7}]
    res = client.compare(pairs)
    raw = httpx.post(
        server + "/compare",
        json={"pairs": [{"prompt": p, "a": a, "b": b} for p, a, b in [pairs[0]]]},
        timeout=30,
    ).json()["results"][0]
    assert res.per_dimension.shape == (2, 3) and not res.failed.any()
    assert res.prob_a_wins[0].item() == pytest.approx(raw["prob_a_wins"], rel=1e-6)
    assert torch.equal(res.per_dimension[0], torch.tensor(raw["per_dimension"]))
    assert torch.allclose(res.per_dimension.sum(-1), res.score, atol=1e-6)


async def test_async_telemetry_merges_every_url(tmp_path) -> None:
    with (
        loopback.serve(_app(tmp_path, "a")) as url_a,
        loopback.serve(_app(tmp_path, "b")) as url_b,
    ):
        async with AsyncGPMClient([url_a, url_b], max_groups_per_request=1) as client:
            await client.wait_ready(timeout=30, interval=0.05, all_urls=True)
            res = await client.score(GROUPS, run_id="r", step=0)  # 3 chunks, round robin
            merged = await client.telemetry("r")
        single_a = GPMClient(url_a).telemetry("r").steps[0]
        single_b = GPMClient(url_b).telemetry("r").steps[0]
    assert single_a.n_responses > 0 and single_b.n_responses > 0  # both replicas got work
    assert merged.steps[0].n_responses == int(res.valid.sum()) == 9
    assert merged.steps[0].allclose(single_a + single_b)


def test_example_script_runs_against_the_service(server, monkeypatch, capsys) -> None:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "score_and_advantages.py"
    monkeypatch.setattr("sys.argv", [str(script), server, "--steps", "3"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "per-dimension Â_l" in out and "monitor fed from /telemetry" in out
    assert "client failures: 0" in out


async def test_async_client_never_recovering_gives_nan(tmp_path, caplog) -> None:
    faults = loopback.FaultInjector(_app(tmp_path), [502], forever=True)
    with loopback.serve(faults) as url:
        slept: list[float] = []

        async def record(delay: float) -> None:
            slept.append(delay)

        async with AsyncGPMClient(url, max_retries=2, k=3, max_groups_per_request=2) as client:
            client._sleep = record
            with caplog.at_level(logging.WARNING, logger="gprl_client.client"):
                res = await client.score(GROUPS)
    assert res.failed.all() and torch.isnan(res.group_scores).all() and client.failures == 3
    assert len(slept) == 4 and faults.injected == 6  # 2 chunks × 3 attempts
    assert sum("could not be scored" in r.message for r in caplog.records) == 2
