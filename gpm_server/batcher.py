"""Cross-request micro-batching: many small concurrent requests → few padded forward passes.

Requests `submit` encoded sequences; each becomes a work item with a future. One background task
forms batches and runs `backend.forward` on model threads (never on the event loop): one by
default; with `workers` = N, up to N batches run at once on N threads, which lets a CPU server
use N cores when one forward cannot (a small model's ops are too small for intra-op threads):

- a batch is flushed when it is full (`max_batch_size` items, or the waiting sequences already
  fill `max_batch_tokens`) or when the oldest waiting item has waited `max_wait_ms`; with
  `flush_when_idle`, also at once when a request arrives to an empty queue while a model
  thread is free (nothing to batch it with: a lone request pays no wait; under load items
  still accumulate while the model runs and go in the next batch together); a batch is only
  formed when a model thread is free to run it;
- the batch always holds the oldest waiting item (so every item is served after at most as many
  batches as there are items older than it), plus the items closest to it in length: waiting items
  are sorted by length and the largest window around the oldest item is taken whose padded cost
  (longest × count) fits the token budget — similar lengths, little padding;
- a batch whose forward raises is split in halves and retried, down to single items, so one bad
  sequence (or an out-of-memory batch) fails only the requests it belongs to;
- items whose request was cancelled (the client went away) are dropped before they reach the model.

The queue is bounded: a submit that would push it past `max_queue` raises a 429 `GPMError`
(except into an empty queue, so a large request can always run).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from gpm_server.errors import GPMError, draining, inference_failed, queue_full
from gpm_server.metrics import Metrics
from gpm_server.protocol import BatchOutput, EncodedSequence, GPMBackend

log = logging.getLogger(__name__)
T = TypeVar("T")
Row = tuple[torch.Tensor, torch.Tensor]  # (embedding [2K], eigenvalues [K])


@dataclass(eq=False)
class _Item:
    seq: EncodedSequence
    future: asyncio.Future[Row]
    enqueued: float
    order: int


def choose_window(costs: Sequence[int], oldest: int, max_tokens: int, max_size: int) -> range:
    """Indices (a contiguous range of the ascending `costs`) of the next batch.

    The range contains `oldest`, has at most `max_size` items, and `costs[end] × count` (padded
    cost) at most `max_tokens` — except a single item, which always fits. Among valid ranges the
    one with the most items wins, ties going to the least padded cost.
    """
    best = range(oldest, oldest + 1)
    best_key = (1, -costs[oldest])
    for start in range(max(0, oldest - max_size + 1), oldest + 1):
        end = start
        while (
            end + 1 < len(costs)
            and end + 2 - start <= max_size
            and costs[end + 1] * (end + 2 - start) <= max_tokens
        ):
            end += 1
        if end < oldest:
            continue
        count = end - start + 1
        key = (count, -costs[end] * count)
        if key > best_key:
            best, best_key = range(start, end + 1), key
    return best


class MicroBatcher:
    """Batches `EncodedSequence`s from concurrent `submit` calls into forward passes."""

    def __init__(
        self,
        backend: GPMBackend,
        *,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        metrics: Metrics | None = None,
        flush_when_idle: bool = False,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.flush_when_idle = flush_when_idle
        self.workers = workers
        self._flush_now = False  # set by a submit that found a free worker and an empty queue
        self._pending: list[_Item] = []
        self._counter = itertools.count()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpm-model")
        self._task: asyncio.Task[None] | None = None
        self._running: dict[asyncio.Task[None], list[_Item]] = {}  # batches being run
        self._closing = False
        self.batches_run = 0  # forward calls, including split retries (tests, benchmarks)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gpm-batcher")

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, finish what was accepted (flushing without waiting); True if done."""
        self._closing = True
        self._arrived.set()
        deadline = time.perf_counter() + timeout_s
        while (self._pending or self._in_flight) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        return not (self._pending or self._in_flight)

    async def close(self) -> None:
        """Stop the loop; anything still waiting fails with a 503."""
        self._closing = True
        tasks = [t for t in (self._task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(draining())
        self._pending.clear()
        self._set_depth()
        self._executor.shutdown(wait=False)

    async def call_in_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the model thread (e.g. the warm-up forward)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def _in_flight(self) -> int:
        """Sequences in batches taken from the queue and not yet finished."""
        return sum(map(len, self._running.values()))

    @property
    def depth(self) -> int:
        """Sequences waiting (O(1); cancelled ones count until the loop drops them, promptly)."""
        return len(self._pending)

    # --- requests --------------------------------------------------------------------------

    async def submit(self, seqs: Sequence[EncodedSequence]) -> BatchOutput:
        """Score `seqs` (B ≥ 1) → embeddings `[B, 2K]`, eigenvalues `[B, K]`, in order.

        Raises a 429 `GPMError` when the queue is full, 503 while draining, and 500
        (`inference_failed`) when the model fails on these sequences even alone.
        """
        if self._closing:
            raise draining()
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if not seqs:
            raise ValueError("submit needs at least one sequence")
        depth = self.depth
        if depth and depth + len(seqs) > self.max_queue:
            raise queue_full(depth)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(s, loop.create_future(), now, next(self._counter)) for s in seqs]
        if self.flush_when_idle and not self._pending and len(self._running) < self.workers:
            self._flush_now = True
        self._pending.extend(items)
        self._set_depth()
        self._arrived.set()
        try:
            rows = await asyncio.gather(*(it.future for it in items))
        except BaseException:
            # Cancelled (client gone) or one item failed: the rest need not run.
            for it in items:
                it.future.cancel()
            self._arrived.set()  # wake the loop to drop them from the queue
            raise
        return BatchOutput(
            embeddings=torch.stack([r[0] for r in rows]),
            eigenvalues=torch.stack([r[1] for r in rows]),
        )

    # --- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            while len(self._running) >= self.workers:  # every model thread is busy
                self._arrived.clear()
                await self._arrived.wait()  # set when a batch finishes (or work arrives)
            await self._wait_until_due()
            batch = self._take_batch()
            if batch:
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._running[task] = batch
                task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        """Bookkeeping of a finished batch task (also one cancelled before it started)."""
        batch = self._running.pop(task)
        for it in batch:  # only when cancelled (close())
            if not it.future.done():
                it.future.set_exception(draining())
        self._arrived.set()  # a model thread is free

    async def _wait_until_due(self) -> None:
        """Return when a batch should be formed: full, oldest item due, or draining."""
        while True:
            self._arrived.clear()
            self._drop_cancelled()
            if self._pending:
                if self._closing or self._flush_now or self._is_full():
                    self._flush_now = False
                    return
                remaining = self._pending[0].enqueued + self.max_wait_s - time.perf_counter()
                if remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    return
            else:
                self._flush_now = False
                await self._arrived.wait()

    def _is_full(self) -> bool:
        if len(self._pending) >= self.max_batch_size:
            return True
        return sum(it.seq.cost for it in self._pending) >= self.max_batch_tokens

    def _drop_cancelled(self) -> None:
        if any(it.future.done() for it in self._pending):
            self._pending = [it for it in self._pending if not it.future.done()]
            self._set_depth()

    def _take_batch(self) -> list[_Item]:
        self._drop_cancelled()
        if not self._pending:
            return []
        oldest = self._pending[0]  # arrival order is kept in _pending
        ranked = sorted(self._pending, key=lambda it: (it.seq.cost, it.order))
        window = choose_window(
            [it.seq.cost for it in ranked],
            ranked.index(oldest),
            self.max_batch_tokens,
            self.max_batch_size,
        )
        batch = [ranked[i] for i in window]
        taken = {id(it) for it in batch}
        self._pending = [it for it in self._pending if id(it) not in taken]
        self._set_depth()
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        batch = [it for it in batch if not it.future.done()]
        if not batch:
            return
        started = time.perf_counter()
        seqs = [it.seq for it in batch]
        self._observe_batch(batch, started)
        loop = asyncio.get_running_loop()
        self.batches_run += 1
        try:
            out = await loop.run_in_executor(self._executor, self.backend.forward, seqs)
            _check_output(out, len(seqs))
        except Exception as exc:
            await self._on_failure(batch, exc)
            return
        finally:
            if self.metrics is not None:
                self.metrics.latency.labels(stage="forward").observe(time.perf_counter() - started)
        emb, eig = out.embeddings.detach().float().cpu(), out.eigenvalues.detach().float().cpu()
        for i, it in enumerate(batch):
            if not it.future.done():
                it.future.set_result((emb[i], eig[i]))

    async def _on_failure(self, batch: list[_Item], exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.batch_failures.inc()
        if len(batch) > 1:
            log.warning("forward failed on a batch of %d (%s); retrying in halves", len(batch), exc)
            mid = len(batch) // 2
            await self._run_batch(batch[:mid])
            await self._run_batch(batch[mid:])
            return
        log.error("forward failed on a single sequence: %r", exc)
        for it in batch:
            if not it.future.done():
                err: GPMError = inference_failed()
                err.__cause__ = exc
                it.future.set_exception(err)

    def _observe_batch(self, batch: list[_Item], started: float) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        costs = [it.seq.cost for it in batch]
        m.batch_size.observe(len(batch))
        m.batch_tokens.labels(kind="padded").observe(max(costs) * len(costs))
        m.batch_tokens.labels(kind="real").observe(sum(costs))
        for it in batch:
            m.latency.labels(stage="queue").observe(started - it.enqueued)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)


def _check_output(out: BatchOutput, n: int) -> None:
    if out.embeddings.shape[0] != n or out.eigenvalues.shape[0] != n:
        raise RuntimeError(
            f"backend returned {out.embeddings.shape[0]} embeddings and "
            f"{out.eigenvalues.shape[0]} eigenvalue rows for {n} sequences"
        )
