"""Dynamic micro-batching: concurrent requests become one model call.

Requests wait in a queue until ``max_batch_size`` rows are gathered or the oldest has waited
``max_wait_ms``; one task then runs the model on the stacked rows in a worker thread (so the
event loop keeps accepting requests) and hands each request its own rows back. While a batch
runs, new requests gather for the next one, so under load batches fill up by themselves.

Requests stack only with requests whose samples have the same shape and dtype (token sequences
of different lengths run in separate batches). The model never sees more than ``max_batch_size``
rows at once, so memory per model call is bounded, and so is ONNX Runtime's arena, which keeps
what it grew to. A larger request queues in turns of up to ``TURN_CALLS * max_batch_size`` rows,
one after the other; a turn runs as model calls of ``max_batch_size`` rows in one trip to the
worker thread, so small requests arriving meanwhile wait for one turn at most, not for all of it.
``max_batch_size=1`` turns batching off: every row is its own model call, and requests run side
by side in the thread pool.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

RunFn = Callable[[np.ndarray], np.ndarray]
BatchHook = Callable[[int, int, float], None]  # (rows, requests, seconds) after each model call
TURN_CALLS = 8  # model calls a large request makes before others get the model


class ShuttingDown(RuntimeError):
    """The batcher is draining for shutdown and takes no new requests."""


@dataclass
class _Request:
    x: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        return self.x.shape[1:], self.x.dtype.str


class MicroBatcher:
    """Gathers ``submit``-ted arrays into batches for ``run`` (rows along axis 0).

    Use ``start()`` inside the event loop before the first request and ``close()`` at shutdown:
    it answers every request already submitted, all of its pieces, before it returns.
    """

    def __init__(
        self,
        run: RunFn,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: BatchHook | None = None,
        threads: int = 4,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        # batching: one model call at a time (the model call itself uses every intra-op thread);
        # no batching: requests run side by side, as a plain threaded server would run them
        self._executor = ThreadPoolExecutor(
            max_workers=1 if self.enabled else threads, thread_name_prefix="gradwise-infer"
        )
        self._pending: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False  # no new requests
        self._stopping = False  # every request answered: the task ends
        self._in_flight = 0
        self._submitted = 0  # submit() calls not yet answered
        self._all_answered = asyncio.Event()
        self._all_answered.set()

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    @property
    def queued(self) -> int:
        """Requests waiting or running."""
        return len(self._pending) + self._in_flight

    async def start(self) -> None:
        """Start the batching task in the running event loop."""
        self._closing = self._stopping = False
        if self.enabled and self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """The model's output rows for the rows of ``x``, in model calls of at most
        ``max_batch_size`` rows."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        self._submitted += 1
        self._all_answered.clear()
        try:
            turn = TURN_CALLS * self.max_batch_size
            if len(x) <= turn:
                return await self._submit_piece(x)
            return np.concatenate(
                [await self._submit_piece(x[i : i + turn]) for i in range(0, len(x), turn)]
            )
        finally:
            self._submitted -= 1
            if self._submitted == 0:
                self._all_answered.set()

    async def _submit_piece(self, x: np.ndarray) -> np.ndarray:
        if not self.enabled or self._task is None:
            self._in_flight += 1
            try:
                return await self._call([x])
            finally:
                self._in_flight -= 1
        request = _Request(x, asyncio.get_running_loop().create_future())
        self._pending.append(request)
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    async def close(self) -> None:
        """Stop taking requests, answer every one already submitted, stop the task and the
        threads."""
        self._closing = True
        await self._all_answered.wait()
        if self._task is not None and self._wakeup is not None:
            self._stopping = True
            self._wakeup.set()
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    # -- the batching task -------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # wait until the batch is full or the oldest request's time is up
            deadline = self._pending[0].arrived + self.max_wait
            while not self._closing and self._ready_rows() < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            self._in_flight += len(batch)
            try:
                await self._run_batch(batch)
            finally:
                self._in_flight -= len(batch)

    def _ready_rows(self) -> int:
        """Rows queued that could join the oldest request's batch."""
        key = self._pending[0].key
        return sum(len(r.x) for r in self._pending if r.key == key)

    def _take(self) -> list[_Request]:
        """The oldest request and, in arrival order, the compatible ones that fit beside it."""
        first = self._pending.popleft()
        batch, rows, rest = [first], len(first.x), deque()
        while self._pending:
            r = self._pending.popleft()
            if r.key == first.key and rows + len(r.x) <= self.max_batch_size:
                batch.append(r)
                rows += len(r.x)
            else:
                rest.append(r)
        self._pending = rest
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done()]  # a client that left is skipped
        if not live:
            return
        try:
            out = await self._call([r.x for r in live])
        except Exception as exc:
            for r in live:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        start = 0
        for r in live:
            if not r.future.done():
                r.future.set_result(out[start : start + len(r.x)])
            start += len(r.x)

    async def _call(self, parts: list[np.ndarray]) -> np.ndarray:
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        loop = asyncio.get_running_loop()
        out, seconds = await loop.run_in_executor(self._executor, self._run_in_calls, x)
        if self.on_batch is not None:
            for i, s in enumerate(seconds):
                rows = min(self.max_batch_size, len(x) - i * self.max_batch_size)
                self.on_batch(rows, len(parts), s)
        return out

    def _run_in_calls(self, x: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """``run`` on ``x`` in calls of at most ``max_batch_size`` rows (in the worker thread),
        and the seconds each took."""
        step = self.max_batch_size
        outs, seconds = [], []
        for i in range(0, len(x), step):
            t0 = time.perf_counter()
            outs.append(self.run(x[i : i + step]))
            seconds.append(time.perf_counter() - t0)
        return (outs[0] if len(outs) == 1 else np.concatenate(outs)), seconds
