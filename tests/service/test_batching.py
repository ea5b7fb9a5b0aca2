"""service.batching.GreedyBatcher: who runs together, who gets which rows, what fails."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from convtune.service.batching import GreedyBatcher, QueueTimeout, lane_layout


class RecordingModel:
    """Rows = the input times two; remembers each call's batch size, thread and duration."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.batch_sizes: list[int] = []
        self.threads: set[int] = set()
        self.calls: list[tuple[float, float]] = []  # (start, end) of each call

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(pixels))
        self.threads.add(threading.get_ident())
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.calls.append((start, time.perf_counter()))
        return pixels * 2


def overlaps(calls: list[tuple[float, float]]) -> int:
    """How many pairs of the (start, end) intervals overlap."""
    return sum(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(calls, 2))


def ready(pixels: np.ndarray) -> Callable[[], np.ndarray]:
    """A request's ``prepare`` whose pixels are already made."""
    return lambda: pixels


def requests(*sizes: int) -> list[np.ndarray]:
    """One array per request, values unique across all of them."""
    bounds = np.cumsum([0, *sizes])
    return [np.arange(a, b, dtype=np.float32)[:, None] for a, b in itertools.pairwise(bounds)]


def test_lone_request_runs_at_once_and_later_ones_share_a_call() -> None:
    model = RecordingModel()

    async def scenario() -> tuple[list[np.ndarray], float]:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(requests(1)[0])))
        await asyncio.sleep(0.01)  # the first call is running now
        started = time.perf_counter()
        others = await asyncio.gather(*(batcher(ready(r)) for r in requests(1, 2, 3)))
        return [await first, *others], time.perf_counter() - started

    inputs = [requests(1)[0], *requests(1, 2, 3)]
    results, waited = asyncio.run(scenario())
    # One call for the first, one for the three that queued behind it: no waiting for more.
    assert model.batch_sizes == [1, 6]
    assert waited < 3 * model.seconds
    assert threading.get_ident() not in model.threads  # never on the event loop's thread
    for given, got in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(got, given * 2)


def test_batches_never_exceed_the_limit_and_keep_requests_whole() -> None:
    model = RecordingModel(seconds=0.02)
    sizes = (3, 3, 3, 3, 5)

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(model, max_batch_size=7, max_wait_s=10)
        return await asyncio.gather(*(batcher(ready(r)) for r in requests(*sizes)))

    results = asyncio.run(scenario())
    assert sum(model.batch_sizes) == sum(sizes)
    assert all(size <= 7 for size in model.batch_sizes)
    for given, got in zip(requests(*sizes), results, strict=True):
        np.testing.assert_array_equal(got, given * 2)


def test_a_failing_call_fails_only_its_own_requests() -> None:
    def infer(pixels: np.ndarray) -> np.ndarray:
        if (pixels < 0).any():
            raise RuntimeError("bad batch")
        time.sleep(0.02)
        return pixels

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(infer, max_batch_size=1, max_wait_s=10)
        bad = np.array([[-1.0]], dtype=np.float32)
        good = np.array([[1.0]], dtype=np.float32)
        return tuple(
            await asyncio.gather(batcher(ready(bad)), batcher(ready(good)), return_exceptions=True)
        )

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError)
    np.testing.assert_array_equal(good, [[1.0]])


def test_requests_queued_too_long_are_refused_and_cancelled_ones_skipped() -> None:
    model = RecordingModel(seconds=0.2)

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=0.05)
        [a, b, c] = requests(1, 1, 1)
        running = asyncio.create_task(batcher(ready(a)))
        await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(batcher(ready(b)))
        late = asyncio.create_task(batcher(ready(c)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        return tuple(await asyncio.gather(running, cancelled, late, return_exceptions=True))

    running, cancelled, late = asyncio.run(scenario())
    np.testing.assert_array_equal(running, requests(1)[0] * 2)
    assert isinstance(cancelled, asyncio.CancelledError)
    assert isinstance(late, QueueTimeout)
    assert model.batch_sizes == [1]  # neither the cancelled nor the stale one ran


def test_without_lanes_one_call_runs_at_a_time() -> None:
    model = RecordingModel(seconds=0.02)

    async def scenario() -> None:
        batcher = GreedyBatcher(model, max_batch_size=1, max_wait_s=10)
        await asyncio.gather(*(batcher(ready(r)) for r in requests(*[1] * 6)))

    asyncio.run(scenario())
    assert overlaps(model.calls) == 0
    assert model.batch_sizes == [1] * 6


def test_load_is_shared_among_lanes_and_the_all_core_call_never_runs_beside_them() -> None:
    infer = RecordingModel(seconds=0.1)
    lanes = [RecordingModel(seconds=0.2), RecordingModel(seconds=0.2)]

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(infer, lanes=lanes, max_batch_size=64, max_wait_s=10)
        [lone, slow, *quick] = requests(1, 1, 1, 1, 1, 1)

        def prepare_slow() -> np.ndarray:
            time.sleep(0.2)  # still decoding when the lone request's call ends
            return slow

        first = asyncio.create_task(batcher(ready(lone)))
        await asyncio.sleep(0.02)  # the lone request runs on the all-core ``infer``
        others = [asyncio.create_task(batcher(prepare_slow))]
        others += [asyncio.create_task(batcher(ready(r))) for r in quick]
        return [await first, *await asyncio.gather(*others)]

    results = asyncio.run(scenario())
    for given, got in zip(requests(1, 1, 1, 1, 1, 1), results, strict=True):
        np.testing.assert_array_equal(got, given * 2)
    # The lone request had the cores to itself; the four that queued behind it were split
    # two and two between the lanes (a decode was still running, so not ``infer``); the
    # slow one went to the first lane to come free.
    assert infer.batch_sizes == [1]
    assert sorted(lanes[0].batch_sizes + lanes[1].batch_sizes) == [1, 2, 2]
    assert overlaps(lanes[0].calls + lanes[1].calls) > 0  # side by side
    assert overlaps(infer.calls + lanes[0].calls) == overlaps(infer.calls + lanes[1].calls) == 0
    assert overlaps(lanes[0].calls) == overlaps(lanes[1].calls) == 0


@pytest.mark.parametrize("inline", [True, False])
def test_an_idle_model_prepares_and_infers_without_a_trip_through_the_event_loop(
    inline: bool,
) -> None:
    loop_blocked_s = 0.2
    times: dict[str, float] = {}

    def infer(pixels: np.ndarray) -> np.ndarray:
        times.setdefault("inferred", time.perf_counter())
        time.sleep(2 * loop_blocked_s)
        times.setdefault("first call done", time.perf_counter())
        return pixels * 2

    async def scenario() -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        batcher = GreedyBatcher(infer, max_batch_size=64, max_wait_s=10)
        [lone, late] = requests(1, 2)

        def prepare_lone() -> np.ndarray:
            # Keep the event loop busy from now on: an inference that had to be started
            # from the loop would wait for it.
            loop.call_soon_threadsafe(time.sleep, loop_blocked_s)
            times["prepared"] = time.perf_counter()
            return lone

        def prepare_late() -> np.ndarray:
            times["late prepared"] = time.perf_counter()
            return late

        first = asyncio.create_task(batcher(prepare_lone, inline=inline))
        while "inferred" not in times:
            await asyncio.sleep(0.005)
        second = await batcher(prepare_late)  # the model is busy with the lone request
        return [await first, second]

    results = asyncio.run(scenario())
    if inline:
        assert times["inferred"] - times["prepared"] < loop_blocked_s / 3
    else:  # prepared on a thread of its own: the loop had to start the inference
        assert times["inferred"] - times["prepared"] >= 0.9 * loop_blocked_s
    # The late request was prepared while the lone one's call still ran.
    assert times["late prepared"] < times["first call done"]
    for given, got in zip(requests(1, 2), results, strict=True):
        np.testing.assert_array_equal(got, given * 2)


@pytest.mark.parametrize("busy", [False, True])
def test_a_failing_prepare_fails_its_request_and_frees_the_model(busy: bool) -> None:
    model = RecordingModel(seconds=0.02)

    def broken() -> np.ndarray:
        raise ValueError("not an image")

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(requests(1)[0]))) if busy else None
        await asyncio.sleep(0)
        failed = await asyncio.gather(batcher(broken), return_exceptions=True)
        after = await batcher(ready(requests(1)[0]))
        return (*failed, after, await first if first else None)

    failed, after, _ = asyncio.run(scenario())
    assert isinstance(failed, ValueError)
    np.testing.assert_array_equal(after, requests(1)[0] * 2)


def test_lane_layout_defaults_to_a_lane_per_core_plus_one_and_reads_the_environment() -> None:
    assert lane_layout(1, {}) == (2, 1)
    assert lane_layout(2, {}) == (3, 1)
    assert lane_layout(16, {}) == (8, 2)  # capped: each lane holds a copy of the weights
    assert lane_layout(2, {"CONVTUNE_INFERENCE_LANES": "0"}) == (0, 2)
    assert lane_layout(8, {"CONVTUNE_INFERENCE_LANES": "2"}) == (2, 4)
    for bad in ("-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="CONVTUNE_INFERENCE_LANES must be a whole number"):
            lane_layout(2, {"CONVTUNE_INFERENCE_LANES": bad})
