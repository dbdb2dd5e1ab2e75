"""MicroBatcher `flush_when_idle`: a lone request runs at once; under load requests still batch."""

from __future__ import annotations

import asyncio

from fakes import FakeBackend

from gpm_server.batcher import MicroBatcher


def _seq(backend: FakeBackend, response: str):
    return backend.encode([("p", response)])[0]


async def test_lone_request_on_idle_model_does_not_wait_for_the_deadline() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=600_000, flush_when_idle=True)
    batcher.start()
    # Without the flag this would wait 10 minutes for the deadline or a full batch.
    out = await asyncio.wait_for(batcher.submit([_seq(backend, "alone")]), 60)
    assert out.embeddings.shape[0] == 1
    assert [len(b) for b in backend.batches] == [1]
    await batcher.close()


async def test_requests_arriving_while_the_model_runs_share_the_next_batch() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=4, max_wait_ms=600_000, flush_when_idle=True)
    batcher.start()
    backend.gate.clear()
    backend.entered.clear()
    first = asyncio.ensure_future(batcher.submit([_seq(backend, "first")]))
    assert await asyncio.to_thread(backend.entered.wait, 10)  # the model is busy with `first`
    rest = [asyncio.ensure_future(batcher.submit([_seq(backend, f"r{i}")])) for i in range(4)]
    for _ in range(20):
        await asyncio.sleep(0)
    backend.gate.set()
    await asyncio.gather(first, *rest)
    # Arrived behind a running batch: no immediate flush, they waited and filled one batch.
    assert [len(b) for b in backend.batches] == [1, 4]
    await batcher.close()


async def test_same_tick_submissions_join_the_immediate_batch() -> None:
    backend = FakeBackend()
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=600_000, flush_when_idle=True)
    batcher.start()
    seqs = [_seq(backend, f"r{i}") for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*(batcher.submit([s]) for s in seqs)), 60)
    assert [len(b) for b in backend.batches] == [3]
    await batcher.close()
