"""Greedy in-process batching: run everything that is waiting, as soon as the model is free.

Each request brings a ``prepare`` function that makes its pixels (decoding, preprocessing).
When the service is idle and ``prepare`` is cheap, the request's ``prepare`` and its
inference run in one call on a worker thread, which spares it a thread hand-off each way.
Otherwise ``prepare`` runs on a worker thread of its own (while the model is busy, if it
is) and the pixels join a queue; whenever an inference slot frees up, what is queued (up to
``max_batch_size`` images) goes into one call. Nothing waits for a batch to fill (on a CPU
a bigger batch gains little, and the wait would be a lone request's loss): a lone request
runs at once, and under load the batch is what arrived during the previous call. BentoML's
own batching is not used: it waits to fill batches, and polls while one runs, taking the
GIL from the inference thread.

Two kinds of inference slot. ``infer`` spreads one call over every core: the fastest for a
lone request, and the only slot without lanes. A lane is an inference function on an
onnxruntime session of its own that uses one core or a few. With lanes, ``infer`` runs only
while nothing else is running or being prepared; under load, the queue is shared out among
the free lanes instead, which run side by side. The reason: a call spread over all cores
stalls whenever any of its threads loses its core to a decode, at every one of the graph's
parallel sections, while a lane that loses its core holds up only its own call.

The measurements behind each choice: docs/benchmarks.md, "Serving" and "Inference lanes".
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
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


Infer = Callable[[np.ndarray], np.ndarray]
LANES_ENV = "CONVTUNE_INFERENCE_LANES"
MAX_DEFAULT_LANES = 8  # each lane is one more onnxruntime session: a copy of the weights


SPIN_ENV = "CONVTUNE_SPIN_WAITS"


def spin_waits(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the all-core session's threads spin while they wait (``CONVTUNE_SPIN_WAITS``
    1) or sleep (0, the default). Spinning answers a lone request on an idle machine a
    little sooner for more CPU per request, and where other work shares the cores it slows
    every request several times over (docs/benchmarks.md, "Per-request cost")."""
    text = environ.get(SPIN_ENV, "0")
    if text not in ("0", "1"):
        raise ValueError(f"{SPIN_ENV} must be 0 or 1, not {text!r}")
    return text == "1"


def lane_layout(cores: int, environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(lanes, threads per lane) for inference under load on ``cores`` cores.

    One lane per core plus one, single-threaded where cores allow, so that a core freed by a
    decode is never left idle (the count was chosen by measurement: docs/benchmarks.md);
    ``CONVTUNE_INFERENCE_LANES`` overrides it (0: no lanes, every call spread over all
    cores).
    """
    text = environ.get(LANES_ENV, str(min(cores + 1, MAX_DEFAULT_LANES)))
    if not text.isdigit():
        raise ValueError(f"{LANES_ENV} must be a whole number, not {text!r}")
    lanes = int(text)
    return lanes, max(1, cores // max(lanes, 1))


class GreedyBatcher:
    """``await batcher(prepare)``: the model's rows for ``prepare()`` (n, ...), batched.

    ``infer`` and each of ``lanes`` map an (N, ...) array to N rows (the same rows: they
    are sessions of one model); each runs on a worker thread, one call at a time, and
    ``infer`` never alongside a lane (see the module docstring). A request's images are
    never split across calls, so one call may exceed ``max_batch_size`` only when a single
    request does. ``prepare`` runs on a worker thread too; ``prepare_limiter`` bounds how
    many run at once outside inference calls (a big image takes a lot of memory while it
    decodes).
    """

    def __init__(
        self,
        infer: Infer,
        *,
        max_batch_size: int,
        max_wait_s: float,
        lanes: Sequence[Infer] = (),
        prepare_limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self._infer = infer
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._lane_count = len(lanes)
        self._free_lanes = list(lanes)
        self._prepare_limiter = prepare_limiter
        self._running = 0  # inference calls in flight
        self._preparing = 0  # prepare calls in flight outside inference calls
        self._queue: deque[_Job] = deque()
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def __call__(
        self, prepare: Callable[[], np.ndarray], *, inline: bool = True
    ) -> np.ndarray:
        """Rows of ``infer`` for ``prepare()``'s pixels.

        ``inline``: ``prepare`` may run inside the inference call when the model is idle.
        Requests that arrive meanwhile wait for it, so pass False when it may be slow.
        """
        if inline and self._idle() and not self._queue:
            self._running += 1
            return await self._until_returned(
                lambda: self._infer(prepare()), release=self._end_inline_call
            )
        self._preparing += 1
        pixels = await self._until_returned(
            prepare, release=self._end_prepare, limiter=self._prepare_limiter
        )
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(pixels, future, time.monotonic()))
        self._start_calls()
        return await future

    async def _until_returned(
        self,
        function: Callable[[], np.ndarray],
        *,
        release: Callable[[], None],
        limiter: anyio.CapacityLimiter | None = None,
    ) -> np.ndarray:
        """``function()`` on a worker thread (a token of ``limiter`` held while it runs);
        ``release()`` once it returns.

        A cancelled caller (BentoML's timeout) stops waiting at once, but the thread runs on
        to its end: its limiter token and the counters ``release`` decrements stay taken
        until then, so work that nobody waits for still counts against the cores.
        """

        async def run() -> np.ndarray:
            try:
                return await anyio.to_thread.run_sync(function, limiter=limiter)
            finally:
                release()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # its caller may be gone: retrieved, so asyncio logs nothing

    def _end_inline_call(self) -> None:
        self._running -= 1
        self._start_calls()

    def _end_prepare(self) -> None:
        self._preparing -= 1

    def _idle(self) -> bool:
        """Whether ``infer`` may take the cores: nothing runs, and with lanes nothing is
        being prepared either (a decode would slow every thread of ``infer``'s call)."""
        return self._running == 0 and not (self._lane_count and self._preparing)

    def _infer_running(self) -> bool:
        return self._running > self._lane_count - len(self._free_lanes)

    def _start_calls(self) -> None:
        if self._idle():
            if jobs := self._take():
                self._launch(jobs, None)
            return
        # Shared out, so that two free lanes take half the queue each, not all and nothing.
        while self._free_lanes and self._queue and not self._infer_running():
            share = -(-len(self._queue) // len(self._free_lanes))
            if not (jobs := self._take(max_jobs=share)):
                return
            self._launch(jobs, self._free_lanes.pop())

    def _launch(self, jobs: list[_Job], lane: Infer | None) -> None:
        self._running += 1
        task = asyncio.create_task(self._run(jobs, lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, max_jobs: int | None = None) -> list[_Job]:
        """The next batch: queued jobs in order, up to ``max_batch_size`` images and
        ``max_jobs`` requests."""
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
            if jobs and (images + len(job.pixels) > self._max_batch_size or len(jobs) == max_jobs):
                break
            jobs.append(self._queue.popleft())
            images += len(job.pixels)
        return jobs

    async def _run(self, jobs: list[_Job], lane: Infer | None) -> None:
        """One inference call for ``jobs``, on ``lane`` or (None) on ``infer``."""
        try:
            pixels = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
            rows = await anyio.to_thread.run_sync(lane or self._infer, pixels)
            bounds = np.cumsum([len(job.pixels) for job in jobs])[:-1]
            for job, job_rows in zip(jobs, np.split(rows, bounds), strict=True):
                if not job.future.done():
                    job.future.set_result(job_rows)
        except Exception as error:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
        finally:
            self._running -= 1
            if lane is not None:
                self._free_lanes.append(lane)
            self._start_calls()
