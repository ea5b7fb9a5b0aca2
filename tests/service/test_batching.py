"""service.batching.GreedyBatcher: who runs together, who gets which rows, what fails.

No test here waits for a clock: a model call is held until the test releases it, the
test waits for conditions (a call started, requests queued), and the queue's clock is
one the test moves. Deadlines are only backstops against a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import anyio
import numpy as np
import pytest
from helpers import BACKSTOP_S, Clock, queued, until

from convtune.service import batching
from convtune.service.batching import GreedyBatcher, QueueTimeout, lane_layout, spin_waits


class Flights:
    """Which model calls were in flight together: each call notes the others as it starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: Counter[str] = Counter()
        self.starts: list[tuple[str, Counter[str]]] = []  # (name, the calls in flight then)

    @contextlib.contextmanager
    def flying(self, name: str) -> Iterator[None]:
        with self._lock:
            self.starts.append((name, +self._now))
            self._now[name] += 1
        try:
            yield
        finally:
            with self._lock:
                self._now[name] -= 1

    def beside(self, name: str) -> set[str]:
        """The calls that were in flight when a call of ``name`` started."""
        return {other for started, others in self.starts if started == name for other in others}


class Model:
    """Rows = the input times two; remembers each call's batch size and thread.

    ``held``: every call waits until ``release()``, so the test decides when it ends.
    """

    def __init__(self, name: str = "infer", *, held: bool = False, flights: Flights | None = None):
        self.name = name
        self.batch_sizes: list[int] = []
        self.threads: set[int] = set()
        self.flights = flights or Flights()
        self._released = threading.Event()
        if not held:
            self._released.set()

    def release(self) -> None:
        self._released.set()

    @property
    def started(self) -> int:
        return len(self.batch_sizes)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(pixels))
        self.threads.add(threading.get_ident())
        with self.flights.flying(self.name):
            assert self._released.wait(BACKSTOP_S), f"{self.name} was never released"
            return pixels * 2


def ready(pixels: np.ndarray) -> Callable[[], np.ndarray]:
    """A request's ``prepare`` whose pixels are already made."""
    return lambda: pixels


def requests(*sizes: int) -> list[np.ndarray]:
    """One array per request, values unique across all of them."""
    bounds = np.cumsum([0, *sizes])
    return [np.arange(a, b, dtype=np.float32)[:, None] for a, b in itertools.pairwise(bounds)]


def assert_rows(results: list[np.ndarray], inputs: list[np.ndarray]) -> None:
    for given, got in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(got, given * 2)


def test_lone_request_runs_at_once_and_later_ones_share_a_call() -> None:
    model = Model(held=True)
    [lone, *later] = inputs = requests(1, 1, 2, 3)

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(lone)))
        await until(lambda: model.started == 1)  # alone, it did not wait for company
        others = [asyncio.create_task(batcher(ready(r))) for r in later]
        await until(lambda: queued(batcher) == 3)
        model.release()
        return [await first, *await asyncio.gather(*others)]

    results = asyncio.run(scenario())
    # One call for the first, one for the three that queued behind it.
    assert model.batch_sizes == [1, 6]
    assert threading.get_ident() not in model.threads  # never on the event loop's thread
    assert_rows(results, inputs)


def test_batches_never_exceed_the_limit_and_keep_requests_whole() -> None:
    model = Model(held=True)
    [first_request, *later] = inputs = requests(3, 3, 3, 3, 5)

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(model, max_batch_size=7, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(first_request)))
        await until(lambda: model.started == 1)
        others = []
        for count, pixels in enumerate(later, start=1):  # each prepared before the next comes
            others.append(asyncio.create_task(batcher(ready(pixels))))
            await until(lambda count=count: queued(batcher) == count)
        model.release()
        return [await first, *await asyncio.gather(*others)]

    results = asyncio.run(scenario())
    # In order, whole requests, at most 7 images: 3+3 fit, a third 3 would not; 3+5 neither.
    assert model.batch_sizes == [3, 6, 3, 5]
    assert_rows(results, inputs)


def test_a_failing_call_fails_only_its_own_requests() -> None:
    def infer(pixels: np.ndarray) -> np.ndarray:
        if (pixels < 0).any():
            raise RuntimeError("bad batch")
        return pixels

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(infer, max_batch_size=1, max_wait_s=10)
        bad = np.array([[-1.0]], dtype=np.float32)
        good = np.array([[1.0]], dtype=np.float32)
        return tuple(
            await asyncio.gather(batcher(ready(bad)), batcher(ready(good)), return_exceptions=True)
        )

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError) and str(bad) == "bad batch"
    np.testing.assert_array_equal(good, [[1.0]])


def test_requests_queued_too_long_are_refused_and_cancelled_ones_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(batching, "time", clock)
    model = Model(held=True)
    [a, b, c, d] = requests(1, 1, 1, 1)

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10)
        running = asyncio.create_task(batcher(ready(a)))
        await until(lambda: model.started == 1)
        stale = asyncio.create_task(batcher(ready(b)))  # queued at 0 s
        cancelled = asyncio.create_task(batcher(ready(c)))
        await until(lambda: queued(batcher) == 2)
        clock.now = 5.0
        fresh = asyncio.create_task(batcher(ready(d)))  # queued at 5 s
        await until(lambda: queued(batcher) == 3)
        cancelled.cancel()
        clock.now = 10.5  # the stale one has waited 10.5 s, the fresh one 5.5 s
        model.release()
        return tuple(await asyncio.gather(running, stale, cancelled, fresh, return_exceptions=True))

    running, stale, cancelled, fresh = asyncio.run(scenario())
    np.testing.assert_array_equal(running, a * 2)
    assert isinstance(stale, QueueTimeout) and str(stale) == "queued over 10 s"
    assert isinstance(cancelled, asyncio.CancelledError)
    np.testing.assert_array_equal(fresh, d * 2)
    assert model.batch_sizes == [1, 1]  # neither the stale nor the cancelled one ran


def test_without_lanes_one_call_runs_at_a_time() -> None:
    model = Model(held=True)
    [lone, *later] = inputs = requests(*[1] * 6)

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(model, max_batch_size=1, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(lone)))
        await until(lambda: model.started == 1)
        others = [asyncio.create_task(batcher(ready(r))) for r in later]
        await until(lambda: queued(batcher) == 5)  # none started beside the held call
        model.release()
        return [await first, *await asyncio.gather(*others)]

    assert_rows(asyncio.run(scenario()), inputs)
    assert model.batch_sizes == [1] * 6
    assert model.flights.beside("infer") == set()


def test_load_is_shared_among_lanes_and_the_all_core_call_never_runs_beside_them() -> None:
    flights = Flights()
    infer = Model("infer", held=True, flights=flights)
    lanes = [Model(f"lane {i}", held=True, flights=flights) for i in range(2)]
    slow_may_finish = threading.Event()
    [lone, slow, *quick] = inputs = requests(1, 1, 1, 1, 1, 1)

    def prepare_slow() -> np.ndarray:
        assert slow_may_finish.wait(BACKSTOP_S)
        return slow

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(infer, lanes=lanes, max_batch_size=64, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(lone)))
        await until(lambda: infer.started == 1)  # the lone request has every core
        others = [asyncio.create_task(batcher(prepare_slow))]
        others += [asyncio.create_task(batcher(ready(r))) for r in quick]
        await until(lambda: queued(batcher) == 4)
        # A decode is still running when the lone request's call ends, so the four queued
        # requests go to the lanes, two each, not to the all-core call.
        infer.release()
        await until(lambda: lanes[0].started == lanes[1].started == 1)  # side by side
        slow_may_finish.set()
        await until(lambda: queued(batcher) == 1)
        for lane in lanes:
            lane.release()  # the first lane to come free takes the slow one
        return [await first, *await asyncio.gather(*others)]

    assert_rows(asyncio.run(scenario()), inputs)
    assert infer.batch_sizes == [1]
    assert sorted(lanes[0].batch_sizes + lanes[1].batch_sizes) == [1, 2, 2]
    assert flights.beside("lane 0") | flights.beside("lane 1") <= {"lane 0", "lane 1"}
    assert "lane 0" not in flights.beside("lane 0") and "lane 1" not in flights.beside("lane 1")
    assert flights.beside("infer") == set()


@pytest.mark.parametrize("inline", [True, False])
def test_an_idle_model_prepares_and_infers_without_a_trip_through_the_event_loop(
    inline: bool,
) -> None:
    """Inline, the lone request's inference starts on its ``prepare``'s thread while the
    event loop is held up; otherwise the loop has to start it, so it waits for the loop."""
    inferred, late_prepared = threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    [lone, late] = inputs = requests(1, 2)

    def infer(pixels: np.ndarray) -> np.ndarray:
        inferred.set()
        seen.setdefault("infer thread", threading.get_ident())
        # The late request is prepared while this call still runs.
        seen.setdefault("late prepared meanwhile", late_prepared.wait(BACKSTOP_S))
        return pixels * 2

    async def scenario() -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        batcher = GreedyBatcher(infer, max_batch_size=64, max_wait_s=10)

        def hold_the_loop() -> None:  # runs on the loop, which can do nothing else meanwhile
            seen["inferred while the loop was held"] = inferred.wait(BACKSTOP_S if inline else 1)

        def prepare_lone() -> np.ndarray:
            seen["prepare thread"] = threading.get_ident()
            loop.call_soon_threadsafe(hold_the_loop)
            return lone

        def prepare_late() -> np.ndarray:
            late_prepared.set()
            return late

        first = asyncio.create_task(batcher(prepare_lone, inline=inline))
        await until(inferred.is_set)
        second = await batcher(prepare_late)  # the model is busy with the lone request
        return [await first, second]

    assert_rows(asyncio.run(scenario()), inputs)
    assert seen["inferred while the loop was held"] is inline
    if inline:
        assert seen["infer thread"] == seen["prepare thread"]
    assert seen["late prepared meanwhile"] is True


@pytest.mark.parametrize("busy", [False, True])
def test_a_failing_prepare_fails_its_request_and_frees_the_model(busy: bool) -> None:
    model = Model(held=busy)
    [x] = requests(1)

    def broken() -> np.ndarray:
        raise ValueError("not an image")

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10)
        first = asyncio.create_task(batcher(ready(x))) if busy else None
        await until(lambda: model.started == int(busy))
        [failed] = await asyncio.gather(batcher(broken), return_exceptions=True)
        model.release()
        after = await batcher(ready(x))
        return failed, after, await first if first else None

    failed, after, first = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and str(failed) == "not an image"
    np.testing.assert_array_equal(after, x * 2)
    if busy:
        np.testing.assert_array_equal(first, x * 2)


def test_lane_layout_defaults_to_a_lane_per_core_plus_one_and_reads_the_environment() -> None:
    assert lane_layout(1, {}) == (2, 1)
    assert lane_layout(2, {}) == (3, 1)
    assert lane_layout(16, {}) == (8, 2)  # capped: each lane holds a copy of the weights
    assert lane_layout(2, {"CONVTUNE_INFERENCE_LANES": "0"}) == (0, 2)
    assert lane_layout(8, {"CONVTUNE_INFERENCE_LANES": "2"}) == (2, 4)
    for bad in ("-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="CONVTUNE_INFERENCE_LANES must be a whole number"):
            lane_layout(2, {"CONVTUNE_INFERENCE_LANES": bad})


def test_a_cancelled_request_keeps_its_decode_slot_until_its_thread_returns() -> None:
    """BentoML's timeout cancels the request, not its thread: the decode runs on, so its
    limiter token and the batcher's count of decodes stay taken until it returns."""
    model = Model()
    limiter = anyio.CapacityLimiter(1)
    started, may_return = threading.Event(), threading.Event()
    next_started = threading.Event()
    [slow, quick] = inputs = requests(1, 1)

    def prepare_slow() -> np.ndarray:
        started.set()
        assert may_return.wait(BACKSTOP_S)
        return slow

    def prepare_quick() -> np.ndarray:
        next_started.set()
        return quick

    async def scenario() -> np.ndarray:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10, prepare_limiter=limiter)
        cancelled = asyncio.create_task(batcher(prepare_slow, inline=False))
        await until(started.is_set)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled  # the caller stops waiting at once
        waiting = asyncio.create_task(batcher(prepare_quick, inline=False))
        await until(lambda: limiter.statistics().tasks_waiting == 1)
        assert limiter.borrowed_tokens == 1 and not next_started.is_set()
        assert batcher._preparing == 2  # the abandoned decode still counts
        may_return.set()
        result = await waiting
        assert limiter.borrowed_tokens == 0 and batcher._preparing == 0
        return result

    np.testing.assert_array_equal(asyncio.run(scenario()), inputs[1] * 2)
    assert model.batch_sizes == [1]  # the abandoned request's pixels never reached the model


def test_a_cancelled_inline_call_holds_the_model_until_its_thread_returns() -> None:
    model = Model(held=True)
    [first, second] = inputs = requests(1, 2)

    async def scenario() -> np.ndarray:
        batcher = GreedyBatcher(model, max_batch_size=64, max_wait_s=10)
        cancelled = asyncio.create_task(batcher(ready(first)))
        await until(lambda: model.started == 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        later = asyncio.create_task(batcher(ready(second)))
        await until(lambda: queued(batcher) == 1)  # queued behind the running call
        assert model.started == 1
        model.release()
        return await later

    np.testing.assert_array_equal(asyncio.run(scenario()), inputs[1] * 2)
    assert model.batch_sizes == [1, 2]
    assert model.flights.beside("infer") == set()  # never two calls at once


def test_spin_waits_is_off_unless_the_environment_turns_it_on() -> None:
    assert spin_waits({}) is False
    assert spin_waits({"CONVTUNE_SPIN_WAITS": "0"}) is False
    assert spin_waits({"CONVTUNE_SPIN_WAITS": "1"}) is True
    with pytest.raises(ValueError, match="CONVTUNE_SPIN_WAITS must be 0 or 1, not 'yes'"):
        spin_waits({"CONVTUNE_SPIN_WAITS": "yes"})
