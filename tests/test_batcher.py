"""MicroBatcher unit tests with the fake backend: no HTTP, no model."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading

import pytest
import torch
from fakes import FakeBackend

from gpm_server.batcher import MicroBatcher, choose_window
from gpm_server.errors import GPMError
from gpm_server.metrics import Metrics


def _seq(backend: FakeBackend, response: str, prompt: str = "p"):
    return backend.encode([(prompt, response)])[0]


async def _hold(backend: FakeBackend, batcher: MicroBatcher) -> asyncio.Task:
    """Occupy the model thread with one (full) forward that waits on `backend.gate`."""
    backend.gate.clear()
    backend.entered.clear()
    full = [_seq(backend, "blocker")] * batcher.max_batch_size
    task = asyncio.ensure_future(batcher.submit(full))
    assert await asyncio.to_thread(backend.entered.wait, 10)
    return task


def _check_rows(backend: FakeBackend, seqs, out) -> None:
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out.embeddings[i], backend.embedding(s), rtol=0, atol=0)
        torch.testing.assert_close(out.eigenvalues[i], backend.eigenvalues(s), rtol=0, atol=0)


# --- choose_window against a brute-force reference -------------------------------------------


def _brute_window(costs, oldest, max_tokens, max_size):
    best_key = None
    for start, end in itertools.combinations_with_replacement(range(len(costs)), 2):
        n = end - start + 1
        if not start <= oldest <= end or n > max_size:
            continue
        if n > 1 and costs[end] * n > max_tokens:
            continue
        key = (n, -costs[end] * n)
        if best_key is None or key > best_key:
            best_key = key
    return best_key


def test_choose_window_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 12)
        costs = sorted(rng.randint(1, 40) for _ in range(n))
        oldest = rng.randrange(n)
        max_tokens, max_size = rng.randint(1, 150), rng.randint(1, 6)
        window = choose_window(costs, oldest, max_tokens, max_size)
        assert oldest in window
        n_win = len(window)
        assert n_win <= max_size
        assert n_win == 1 or costs[window[-1]] * n_win <= max_tokens
        key = (n_win, -costs[window[-1]] * n_win)
        assert key == _brute_window(costs, oldest, max_tokens, max_size)


# --- batching --------------------------------------------------------------------------------


async def test_concurrent_submissions_share_a_batch() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=10_000)
    batcher.start()
    seqs = [_seq(backend, f"response {i}") for i in range(8)]
    outs = await asyncio.gather(*(batcher.submit([s]) for s in seqs))
    # Flushed because it was full (the 10 s deadline never came): one forward for 8 requests.
    assert [len(b) for b in backend.batches] == [8]
    for s, out in zip(seqs, outs, strict=True):
        _check_rows(backend, [s], out)
    assert threading.main_thread().ident not in backend.threads
    await batcher.close()


async def test_deadline_flushes_a_partial_batch() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=64, max_wait_ms=20)
    batcher.start()
    seqs = [_seq(backend, f"r{i}") for i in range(3)]
    outs = await asyncio.gather(*(batcher.submit([s]) for s in seqs))
    assert sum(len(b) for b in backend.batches) == 3
    assert len(backend.batches) < 3  # they waited for each other
    for s, out in zip(seqs, outs, strict=True):
        _check_rows(backend, [s], out)
    await batcher.close()


async def test_token_budget_and_size_respected_and_lengths_sorted() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_tokens=120, max_batch_size=4, max_wait_ms=0)
    batcher.start()
    blocker = await _hold(backend, batcher)
    rng = random.Random(1)
    seqs = [_seq(backend, "x" * rng.randint(1, 40)) for _ in range(30)]
    tasks = [asyncio.ensure_future(batcher.submit([s])) for s in seqs]
    await asyncio.sleep(0)
    backend.gate.set()
    outs = await asyncio.gather(*tasks)
    await blocker
    for s, out in zip(seqs, outs, strict=True):
        _check_rows(backend, [s], out)
    for batch in backend.batches[1:]:
        costs = [s.cost for s in batch]
        assert len(batch) <= 4
        assert len(batch) == 1 or max(costs) * len(batch) <= 120

    # Sorting: padding is far below what arrival order (FIFO) would give for the same sizes.
    def padding(costs: list[int]) -> int:
        return max(costs) * len(costs) - sum(costs)

    sorted_pad = sum(padding([s.cost for s in b]) for b in backend.batches[1:])
    fifo, i, fifo_pad = [s.cost for s in seqs], 0, 0
    for b in backend.batches[1:]:
        fifo_pad += padding(fifo[i : i + len(b)])
        i += len(b)
    assert sorted_pad < fifo_pad
    await batcher.close()


async def test_oldest_item_is_never_starved() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_tokens=10_000, max_batch_size=2, max_wait_ms=0)
    batcher.start()
    blocker = await _hold(backend, batcher)
    long = _seq(backend, "L" * 60)  # longest and oldest: sorting alone would serve it last
    shorts = [_seq(backend, f"s{i}") for i in range(6)]
    tasks = [asyncio.ensure_future(batcher.submit([s])) for s in [long, *shorts]]
    await asyncio.sleep(0)
    backend.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert long in backend.batches[1]
    await batcher.close()


# --- failures ---------------------------------------------------------------------------------


async def test_failure_reaches_only_its_own_request() -> None:
    backend = FakeBackend(fail_marker="FAIL")
    batcher = MicroBatcher(backend, max_batch_size=4, max_wait_ms=10_000)
    batcher.start()
    ok_a = [_seq(backend, "fine a")]
    bad = [_seq(backend, "this will FAIL")]
    ok_c = [_seq(backend, "fine c"), _seq(backend, "fine d")]
    results = await asyncio.gather(
        batcher.submit(ok_a), batcher.submit(bad), batcher.submit(ok_c), return_exceptions=True
    )
    _check_rows(backend, ok_a, results[0])
    _check_rows(backend, ok_c, results[2])
    assert isinstance(results[1], GPMError)
    assert (results[1].status, results[1].code) == (500, "inference_failed")
    assert isinstance(results[1].__cause__, RuntimeError)
    assert len(backend.batches[0]) == 4  # they did share the failing batch
    await batcher.close()


async def test_failing_batch_is_split_and_retried() -> None:
    backend = FakeBackend(max_ok_batch=2)  # "out of memory" above 2 sequences
    metrics = Metrics()
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=10_000, metrics=metrics)
    batcher.start()
    seqs = [_seq(backend, f"resp {i}") for i in range(8)]
    outs = await asyncio.gather(*(batcher.submit([s]) for s in seqs))
    for s, out in zip(seqs, outs, strict=True):
        _check_rows(backend, [s], out)
    assert [len(b) for b in backend.batches] == [8, 4, 2, 2, 4, 2, 2]
    assert metrics.batch_failures._value.get() == 3
    await batcher.close()


async def test_queue_full_raises_429_and_empty_queue_accepts_anything() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=64, max_queue=3, max_wait_ms=0)
    batcher.start()
    blocker = await _hold(backend, batcher)  # in flight: not counted as waiting
    waiting = asyncio.ensure_future(batcher.submit([_seq(backend, f"w{i}") for i in range(3)]))
    await asyncio.sleep(0)
    assert batcher.depth == 3
    with pytest.raises(GPMError) as info:
        await batcher.submit([_seq(backend, "one too many")])
    assert info.value.status == 429
    assert info.value.code == "queue_full"
    assert int(info.value.headers["Retry-After"]) >= 1
    backend.gate.set()
    await asyncio.gather(blocker, waiting)
    big = [_seq(backend, f"b{i}") for i in range(10)]  # 10 > max_queue, but the queue is empty
    _check_rows(backend, big, await batcher.submit(big))
    await batcher.close()


async def test_cancelled_request_is_skipped() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=64, max_wait_ms=0)
    batcher.start()
    blocker = await _hold(backend, batcher)
    gone = _seq(backend, "client went away")
    doomed = asyncio.ensure_future(batcher.submit([gone]))
    kept = [_seq(backend, "still here")]
    alive = asyncio.ensure_future(batcher.submit(kept))
    await asyncio.sleep(0)
    doomed.cancel()
    backend.gate.set()
    _check_rows(backend, kept, await alive)
    await blocker
    assert doomed.cancelled()
    assert all(gone not in batch for batch in backend.batches)
    await batcher.close()


async def test_drain_finishes_accepted_work_and_refuses_new() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=2, max_wait_ms=10_000)
    batcher.start()
    blocker = await _hold(backend, batcher)
    seqs = [_seq(backend, f"accepted {i}") for i in range(5)]
    accepted = [asyncio.ensure_future(batcher.submit([s])) for s in seqs]
    await asyncio.sleep(0)
    drain = asyncio.ensure_future(batcher.drain(timeout_s=30))
    await asyncio.sleep(0)
    with pytest.raises(GPMError) as info:
        await batcher.submit([_seq(backend, "late")])
    assert (info.value.status, info.value.code) == (503, "draining")
    backend.gate.set()
    assert await drain  # the 10 s deadline is ignored while draining
    await blocker
    outs = await asyncio.gather(*accepted)
    for s, out in zip(seqs, outs, strict=True):
        _check_rows(backend, [s], out)
    await batcher.close()


async def test_close_fails_waiting_requests_with_503() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=64, max_wait_ms=0)
    batcher.start()
    blocker = await _hold(backend, batcher)
    waiting = asyncio.ensure_future(batcher.submit([_seq(backend, "never runs")]))
    await asyncio.sleep(0)
    await batcher.close()
    backend.gate.set()
    with pytest.raises(GPMError) as info:
        await waiting
    assert info.value.status == 503
    await asyncio.gather(blocker, return_exceptions=True)


async def test_metrics_observe_batches() -> None:
    backend = FakeBackend()
    metrics = Metrics()
    batcher = MicroBatcher(backend, max_batch_size=3, max_wait_ms=10_000, metrics=metrics)
    batcher.start()
    seqs = [_seq(backend, "a"), _seq(backend, "bbbbbbbb"), _seq(backend, "cc")]
    await asyncio.gather(*(batcher.submit([s]) for s in seqs))
    reg = metrics.registry
    assert reg.get_sample_value("gpm_batch_size_count") == 1
    assert reg.get_sample_value("gpm_batch_size_sum") == 3
    costs = [s.cost for s in seqs]
    assert reg.get_sample_value("gpm_batch_tokens_sum", {"kind": "padded"}) == max(costs) * 3
    assert reg.get_sample_value("gpm_batch_tokens_sum", {"kind": "real"}) == sum(costs)
    assert reg.get_sample_value("gpm_stage_seconds_count", {"stage": "queue"}) == 3
    assert reg.get_sample_value("gpm_queue_depth") == 0
    await batcher.close()


# --- several model threads -------------------------------------------------------------------


class _CountingBackend(FakeBackend):
    """Records how many forwards run at once; each waits on `gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.most_active = 0

    def forward(self, seqs):  # type: ignore[no-untyped-def]
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            return super().forward(seqs)
        finally:
            with self._lock:
                self.active -= 1


@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_workers_bound_the_batches_running_at_once(workers: int) -> None:
    backend = _CountingBackend()
    backend.gate.clear()
    batcher = MicroBatcher(backend, max_batch_size=1, max_wait_ms=0, workers=workers)
    batcher.start()
    seqs = [_seq(backend, f"response {i}") for i in range(6)]
    tasks = [asyncio.ensure_future(batcher.submit([s])) for s in seqs]
    for _ in range(200):  # until every free thread has taken a batch
        await asyncio.sleep(0.005)
        if backend.active == workers:
            break
    await asyncio.sleep(0.05)  # a further batch would start now if the bound leaked
    assert backend.active == workers and batcher.depth == len(seqs) - workers
    backend.gate.set()
    outs = await asyncio.gather(*tasks)
    assert backend.most_active == workers
    assert len(backend.threads) == workers  # each batch on a model thread, never the loop's
    for s, out in zip(seqs, outs, strict=True):
        _check_rows(backend, [s], out)
    await batcher.close()


async def test_close_fails_batches_still_running_on_several_threads() -> None:
    backend = _CountingBackend()
    backend.gate.clear()
    batcher = MicroBatcher(backend, max_batch_size=1, max_wait_ms=0, workers=2)
    batcher.start()
    tasks = [asyncio.ensure_future(batcher.submit([_seq(backend, f"r{i}")])) for i in range(3)]
    for _ in range(200):
        await asyncio.sleep(0.005)
        if backend.active == 2:
            break
    await batcher.close()
    backend.gate.set()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(result, GPMError) and result.status == 503


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(FakeBackend(), workers=0)
