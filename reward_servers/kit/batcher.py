"""Dynamic batching shared by every reward server.

Requests put their items (images, image-question pairs, text pairs) into one FIFO queue. A collector task takes up to
`max_batch_size` items as soon as that many wait, or once the oldest has waited `max_wait_s`, and runs them as one
model batch on a single worker thread, so the event loop keeps serving while the model computes. A request's items
may span several batches; its answer is assembled in order, so each request gets exactly its own outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFull(Exception):
    """The queue cannot take the request's items now; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full, retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before all of its items were computed."""


class InferenceFailed(Exception):
    """The model raised on a batch this request had items in (logged with its traceback on the server)."""


class BatchObserver(Protocol):
    """Where the batcher reports what it does (Prometheus in the servers, nothing in unit tests)."""

    def observe_batch(self, size: int, seconds: float) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


@dataclass(eq=False)
class _Job:
    """One request: its items, the outputs gathered so far, and the future its handler awaits."""

    items: Sequence[Any]
    future: asyncio.Future[list[Any]]
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    dropped: bool = False


@dataclass(eq=False)
class _Entry:
    job: _Job
    index: int
    enqueued_at: float


class DynamicBatcher(Generic[In, Out]):
    """Merges concurrent `submit` calls into model batches of at most `max_batch_size` items.

    `run_batch(items) -> outputs` is the model: called on one worker thread, one batch at a time, and it must return
    one output per item, in order.
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], list[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer
        self._pending: deque[_Entry] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None
        self._batch_seconds = 0.1  # running mean of model time per batch, for Retry-After

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch the model is computing)."""
        return len(self._pending)

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="batch-collector")

    async def stop(self) -> None:
        """Stop collecting; requests still queued fail. A batch already computing runs to its end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            job = self._pending.popleft().job
            if not job.future.done():
                job.future.set_exception(InferenceFailed("server is shutting down"))
        self._executor.shutdown(wait=False)

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained by one request's worth (at least 1)."""
        batches_ahead = math.ceil(len(self._pending) / self.max_batch_size) + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    async def submit(self, items: Sequence[In], timeout_s: float) -> list[Out]:
        """Outputs for `items`, in order. Raises QueueFull, DeadlineExceeded or InferenceFailed."""
        if not items:
            return []
        if len(self._pending) + len(items) > self.max_queue:
            raise QueueFull(self.retry_after_s())
        job = _Job(items=items, future=asyncio.get_running_loop().create_future())
        job.results = [None] * len(items)
        job.remaining = len(items)
        # Retrieve a late exception so that a job whose handler already gave up logs nothing spurious.
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        now = time.monotonic()
        self._pending.extend(_Entry(job, i, now) for i in range(len(items)))
        self._report_depth()
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(job.future)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline of {timeout_s:.3f}s exceeded") from None
        finally:
            if not job.future.done():  # deadline or client gone: items not yet in a batch never run
                self._drop(job)

    def _drop(self, job: _Job) -> None:
        job.dropped = True
        job.future.cancel()
        self._pending = deque(e for e in self._pending if e.job is not job)
        self._report_depth()

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.set_queue_depth(len(self._pending))

    async def _collect(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._wait_for_batch()
            if not self._pending:  # every waiting request gave up
                continue
            entries = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            self._report_depth()
            await self._run(entries)

    async def _wait_for_batch(self) -> None:
        """Return once a full batch waits, or once the oldest waiting item has waited max_wait_s."""
        while self._pending and len(self._pending) < self.max_batch_size:
            left = self._pending[0].enqueued_at + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self._arrived.wait()
            except TimeoutError:
                return

    async def _run(self, entries: list[_Entry]) -> None:
        items = [e.job.items[e.index] for e in entries]
        started = time.monotonic()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, items)
            if len(outputs) != len(items):
                raise RuntimeError(f"model returned {len(outputs)} outputs for {len(items)} items")
        except Exception:
            logger.exception("model batch of %d items failed", len(items))
            for job in dict.fromkeys(e.job for e in entries):
                if not job.future.done():
                    job.future.set_exception(InferenceFailed("inference failed"))
            return
        seconds = time.monotonic() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.observer is not None:
            self.observer.observe_batch(len(items), seconds)
        for entry, output in zip(entries, outputs, strict=True):
            job = entry.job
            if job.dropped or job.future.done():
                continue
            job.results[entry.index] = output
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.results)
