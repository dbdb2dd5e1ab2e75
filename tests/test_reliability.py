"""Faults: kill -9 and restart mid-run, SIGTERM drain, out-of-memory batches, disconnecting
clients, and the admission limit. Nothing lost, nothing silently wrong.

Servers run the real app (and, for SIGTERM, the real `gpm-server serve` code path) around the
deterministic `FakeBackend`, so a reference scoring is exact and start-up takes seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import loopback
import pytest
import torch
from apptools import serve
from fakes import FakeBackend

from gpm_server.app import AdmissionLimit
from gpm_server.telemetry_store import TelemetryStore
from gprl_client.client import GPMClient
from gprl_client.telemetry import stats_from_tensors

TESTS = Path(__file__).resolve().parent


def _groups(step: int, n: int = 6) -> list[dict]:
    return [
        {
            "prompt": f"step {step} prompt {i}",
            "responses": [f"r{j} of {i}@{step}" for j in range(3)],
        }
        for i in range(n)
    ]


def _spawn(code: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPM_")}
    # This checkout's packages, not whatever an editable install elsewhere maps them to.
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(TESTS))


def _uvicorn_code(tmp_path: Path, port: int, delay_s: float) -> str:
    """A server process: the real app on a slow FakeBackend, telemetry in tmp_path/k.sqlite3."""
    return (
        f"import sys, pathlib; sys.path.insert(0, {str(TESTS)!r}); "
        "import loopback, uvicorn; from fakes import FakeBackend; "
        f"app = loopback.make_app(pathlib.Path({str(tmp_path)!r}), 'k', "
        f"backend=FakeBackend(k=3, delay_s={delay_s}), max_batch_size=4); "
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')"
    )


def _assert_equal_or_failed(result, reference) -> int:
    """Every group either equals the reference or is marked failed with NaN rows."""
    failed = result.failed
    assert failed.shape == reference.failed.shape and not reference.failed.any()
    assert torch.isnan(result.rewards[failed]).all()
    ok = ~failed
    torch.testing.assert_close(result.embeddings[ok], reference.embeddings[ok])
    torch.testing.assert_close(result.eigenvalues[ok], reference.eigenvalues[ok])
    torch.testing.assert_close(result.group_scores[ok], reference.group_scores[ok], equal_nan=True)
    return int(failed.sum())


def _stats(result, step: int):
    ok = ~result.failed
    return stats_from_tensors(
        result.eigenvalues[ok], result.group_scores[ok], result.response_tokens[ok], step
    )


@pytest.mark.slow
def test_kill_9_mid_run_and_restart_loses_nothing(tmp_path) -> None:
    """SIGKILL while a learner is scoring, restart on the same port and telemetry file: every
    group is scored correctly or reported failed, and telemetry is exactly the scored groups."""
    url = loopback.dead_url()
    port = int(url.rsplit(":", 1)[1])
    steps = 10
    with loopback.serve(loopback.make_app(tmp_path, "ref")) as ref_url, GPMClient(ref_url) as ref:
        reference = [ref.score(_groups(s)) for s in range(steps)]
    proc = _spawn(_uvicorn_code(tmp_path, port, delay_s=0.05))
    results: list = []
    client = GPMClient(
        url, max_retries=80, backoff=0.1, max_backoff=0.5, max_groups_per_request=2, k=3
    )
    try:
        loopback.wait_ready(url, proc)

        def learner() -> None:
            for s in range(steps):
                results.append(client.score(_groups(s), run_id="r", step=s))

        thread = threading.Thread(target=learner)
        thread.start()
        while len(results) < 3:
            assert thread.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        acked = list(results)  # steps answered before the kill (the next cannot finish now)
        store = TelemetryStore(tmp_path / "k.sqlite3")
        on_disk = store.query("r")
        store.close()
        for s, res in enumerate(acked):
            assert on_disk.steps[s].allclose(_stats(res, s)), f"step {s} lost or changed"
        proc = _spawn(_uvicorn_code(tmp_path, port, delay_s=0.0))
        thread.join(300)
        assert not thread.is_alive()
        telemetry = client.telemetry("r")
    finally:
        client.close()
        proc.kill()
        proc.wait(30)
    assert len(acked) < steps and len(results) == steps
    failed = sum(_assert_equal_or_failed(r, ref) for r, ref in zip(results, reference, strict=True))
    assert failed == client.failures
    assert client.retries > 0  # the kill was felt
    for s, res in enumerate(results):  # exactly once: nothing lost, no retry counted twice
        if res.failed.all():
            continue
        assert telemetry.steps[s].allclose(_stats(res, s)), f"step {s}"


def test_sigterm_drains_accepted_requests(tmp_path) -> None:
    """The real `gpm-server serve` path (CLI, uvicorn, lifespan) with a slow fake model: requests
    accepted before SIGTERM all get 200, then the process exits 0."""
    url = loopback.dead_url()
    port = url.rsplit(":", 1)[1]
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
        "import gpm_server.app as app; from fakes import FakeBackend; "
        "app.load_backend = lambda settings: FakeBackend(k=3, delay_s=0.3); "
        "from gpm_server.cli import main; "
        f"sys.exit(main(['serve', '--model', 'fake', '--port', '{port}', '--max-batch-size', '1',"
        f" '--telemetry-db', {str(tmp_path / 't.sqlite3')!r}, '--log-level', 'warning']))"
    )
    proc = _spawn(code)
    n = 6
    try:
        loopback.wait_ready(url, proc)
        body = {"groups": [{"prompt": "p", "responses": ["a"]}]}
        with ThreadPoolExecutor(n) as pool:
            futures = [
                pool.submit(httpx.post, url + "/score", json=body, timeout=60) for _ in range(n)
            ]
            deadline = time.monotonic() + 60
            while _queue_depth(url) < n - 1:  # all accepted: one running, the rest queued
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in futures]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert statuses == [200] * n
    with pytest.raises(httpx.TransportError):
        httpx.post(url + "/score", json=body, timeout=5)


def _queue_depth(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("gpm_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no gpm_queue_depth in /metrics")


class OOMBackend(FakeBackend):
    """Raises an out-of-memory error for batches over `max_ok` sequences, and always for a
    sequence whose response contains "HUGE" (too big even alone)."""

    def __init__(self, error: type[Exception], max_ok: int = 2) -> None:
        super().__init__(k=3)
        self.error, self.max_ok = error, max_ok
        self.sizes: list[int] = []

    def forward(self, seqs):
        self.sizes.append(len(seqs))
        if len(seqs) > self.max_ok or any(s.input_ids[-2] == 3 + ord("!") % 251 for s in seqs):
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(seqs)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
async def test_out_of_memory_batch_is_split_and_fails_only_its_own_request(error) -> None:
    backend = OOMBackend(error)
    reference = FakeBackend(k=3)
    bodies = [
        {"groups": [{"prompt": f"p{i}", "responses": [f"r{j}" for j in range(1 + i % 3)]}]}
        for i in range(8)
    ]
    bad = {"groups": [{"prompt": "p", "responses": ["fine", "HUGE!"]}]}
    async with serve(backend, max_wait_ms=50, max_batch_size=16) as (app, client):
        backend.sizes.clear()
        answers = await asyncio.gather(
            *(client.post("/score", json=b) for b in [*bodies, bad, *bodies])
        )
        failures = app.state.metrics.batch_failures._value.get()
    statuses = [a.status_code for a in answers]
    assert statuses == [200] * 8 + [500] + [200] * 8
    assert answers[8].json()["error"]["code"] == "inference_failed"
    assert max(backend.sizes) > backend.max_ok and failures > 0  # it did split
    for body, answer in zip([*bodies, *bodies], [*answers[:8], *answers[9:]], strict=True):
        group = body["groups"][0]
        seqs = reference.encode([(group["prompt"], r) for r in group["responses"]])
        expected = torch.stack([reference.embedding(s) for s in seqs])
        got = torch.tensor(answer.json()["groups"][0]["embeddings"])
        torch.testing.assert_close(got, expected)


def _admission(app) -> AdmissionLimit:
    layer = app.middleware_stack
    while not isinstance(layer, AdmissionLimit):
        layer = layer.app
    return layer


def test_disconnecting_clients_leak_nothing(tmp_path) -> None:
    """Clients that time out while their requests wait for the model: afterwards the queue is
    empty, no future is pending, the admission count is 0, and the thread count is stable."""
    backend = FakeBackend(k=3)
    app = loopback.make_app(tmp_path, backend=backend, max_wait_ms=0, max_batch_size=2)
    body = {"groups": [{"prompt": "p", "responses": ["a", "b"]}]}
    threads = []
    with loopback.serve(app) as url:
        httpx.post(url + "/score", json=body).raise_for_status()
        batcher = app.state.batcher
        for _ in range(3):
            backend.gate.clear()
            ran = len(backend.batches)

            def gone() -> None:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url + "/score", json=body, timeout=httpx.Timeout(30, read=0.5))

            with ThreadPoolExecutor(8) as pool:
                for f in [pool.submit(gone) for _ in range(8)]:
                    f.result()
            backend.gate.set()
            # Cancelled items stay queued until the running forward ends, then are dropped.
            deadline = time.monotonic() + 30
            while _busy(app) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.depth == 0 and batcher._pending == [] and batcher._in_flight == 0
            assert _admission(app).in_flight == 0
            assert len(backend.batches) - ran <= 1  # only the batch already running
            assert httpx.post(url + "/score", json=body).status_code == 200
            threads.append(_threads())
    # Only the bounded pools may grow (lazily); no other thread is left behind.
    assert all(names == threads[0][0] for names, _ in threads)
    assert max(pooled for _, pooled in threads) <= 40 + min(32, (os.cpu_count() or 1) + 4)


# Lazily grown, bounded pools: the loop's default executor (asyncio/uvloop) and AnyIO's
# thread pool for sync dependencies (40 threads by default).
_POOLS = ("asyncio_", "uvloop_", "AnyIO worker thread")


def _busy(app) -> bool:
    batcher = app.state.batcher
    return bool(batcher.depth or batcher._in_flight or _admission(app).in_flight)


def _threads() -> tuple[list[str], int]:
    names = [t.name for t in threading.enumerate()]
    pooled = [n for n in names if n.startswith(_POOLS)]
    return sorted(n for n in names if not n.startswith(_POOLS)), len(pooled)


async def test_admission_limit_sheds_with_429_and_recovers() -> None:
    backend = FakeBackend()
    async with serve(backend, max_in_flight=2, max_wait_ms=0, max_batch_size=1) as (app, client):
        one = {"groups": [{"prompt": "p", "responses": ["a"]}]}
        backend.gate.clear()
        held = [asyncio.ensure_future(client.post("/score", json=one)) for _ in range(2)]
        while _admission(app).in_flight < 2:
            await asyncio.sleep(0.005)
        shed = await client.post("/score", json=one)
        assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "too_many_requests"
        assert (await client.get("/health")).status_code == 200  # GETs are not limited
        backend.gate.set()
        assert [(await h).status_code for h in held] == [200, 200]
        assert (await client.post("/score", json=one)).status_code == 200
        assert _admission(app).in_flight == 0
