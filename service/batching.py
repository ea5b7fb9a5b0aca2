"""Greedy in-process batching: run everything that is waiting, as soon as the model is free.

Each request brings a ``prepare`` function that makes its pixels (decoding, preprocessing).
When the model is idle and ``prepare`` is cheap, the request's ``prepare`` and its
inference run in one call on a worker thread. Otherwise ``prepare`` runs on a worker
thread of its own (while the model is busy, if it is) and the pixels join a queue; whenever
an inference slot frees up, everything queued (up to ``max_batch_size`` images) goes into
one call. Nothing waits for a batch to fill: a lone request runs at once, and under load
the batch is what arrived during the previous call.

This replaced BentoML's CorkDispatcher, which waits to fill batches and polls every 1 ms
while one runs (taking the GIL from the inference thread): on 2 cores a lone request's p50
went from 27.6 to 22.1 ms and 8 clients got 7 % more requests/s. Preparing and inferring
in one call saves a lone request a thread hand-off each way: its p50 fell by 0.4 ms; the two
hand-offs had cost 0.8-1.1 ms (``benchmarks/serve.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import numpy as np


class QueueTimeout(Exception):
    """A request waited in the queue longer than ``max_wait_s`` and was not run."""


@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future[np.ndarray]
    queued: float


class GreedyBatcher:
    """``await batcher(prepare)``: ``infer`` on ``prepare()`` (n, ...), batched with others.

    ``infer`` maps an (N, ...) array to N rows; it runs on a worker thread, at most
    ``slots`` calls at once. A request's images are never split across calls, so one call
    may exceed ``max_batch_size`` only when a single request does. ``prepare`` runs on a
    worker thread too; ``prepare_limiter`` bounds how many run at once outside inference
    calls (a big image takes a lot of memory while it decodes).
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_wait_s: float,
        slots: int = 1,
        prepare_limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self._infer = infer
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._slots = slots
        self._prepare_limiter = prepare_limiter
        self._running = 0
        self._queue: deque[_Job] = deque()
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def __call__(
        self, prepare: Callable[[], np.ndarray], *, inline: bool = True
    ) -> np.ndarray:
        """Rows of ``infer`` for ``prepare()``'s pixels.

        ``inline``: ``prepare`` may run inside the inference call when the model is idle.
        Requests that arrive meanwhile wait for it, so pass False when it may be slow.
        """
        if inline and self._running < self._slots and not self._queue:
            self._running += 1
            try:
                return await anyio.to_thread.run_sync(lambda: self._infer(prepare()))
            finally:
                self._running -= 1
                self._start_calls()
        pixels = await anyio.to_thread.run_sync(prepare, limiter=self._prepare_limiter)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(pixels, future, time.monotonic()))
        self._start_calls()
        return await future

    def _start_calls(self) -> None:
        while self._running < self._slots and (jobs := self._take()):
            self._running += 1
            task = asyncio.create_task(self._run(jobs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Job]:
        """The next batch: queued jobs in order, up to ``max_batch_size`` images."""
        jobs: list[_Job] = []
        images = 0
        now = time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # its request was cancelled (client gone, timeout)
                self._queue.popleft()
                continue
            if now - job.queued > self._max_wait_s:
                self._queue.popleft()
                job.future.set_exception(QueueTimeout(f"queued over {self._max_wait_s:g} s"))
                continue
            if jobs and images + len(job.pixels) > self._max_batch_size:
                break
            jobs.append(self._queue.popleft())
            images += len(job.pixels)
        return jobs

    async def _run(self, jobs: list[_Job]) -> None:
        try:
            pixels = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
            rows = await anyio.to_thread.run_sync(self._infer, pixels)
            bounds = np.cumsum([len(job.pixels) for job in jobs])[:-1]
            for job, part in zip(jobs, np.split(rows, bounds), strict=True):
                if not job.future.done():
                    job.future.set_result(part)
        except Exception as error:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
        finally:
            self._running -= 1
            self._start_calls()
