"""The service's own queue, in this process: the real ``Convtune`` class and its routes,
the suite's exported model, requests over ASGI.

A request queued over 10 s is refused with a 503, and under load the queued requests run
in the inference lanes, side by side. The test holds the model's calls and moves the
queue's clock itself, so nothing depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
from helpers import (
    BACKSTOP_S,
    Clock,
    assert_json_error,
    assert_same_numbers,
    image_file,
    queued,
    until,
)

from convtune.models.inference import OnnxClassifier
from convtune.service import batching

pytestmark = pytest.mark.slow


class Held:
    """The model's inference calls, each recorded (which function, how many images) and
    held until the test releases its kind: the all-core call or the lanes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._released = {"all cores": threading.Event(), "lane": threading.Event()}

    def release(self, kind: str) -> None:
        self._released[kind].set()

    def started(self, name: str) -> int:
        return sum(called == name for called, _ in self.calls)

    def call(self, name: str, infer: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray):
        self.calls.append((name, len(pixels)))
        kind = "lane" if name.startswith("lane") else name
        assert self._released[kind].wait(BACKSTOP_S), f"{name} was never released"
        return infer(pixels)


@dataclass
class InProcess:
    service: Any  # the Convtune instance
    held: Held
    clock: Clock

    def queued(self) -> int:
        return queued(self.service._batcher)

    def client(self) -> httpx.AsyncClient:
        from convtune.service.routes import app

        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


@pytest.fixture
def in_process(exported, monkeypatch: pytest.MonkeyPatch) -> InProcess:
    """``Convtune()`` on 2 cores with 2 lanes, every inference call held by the test."""
    import convtune.service.service as module

    held, clock = Held(), Clock()
    monkeypatch.setattr(batching, "time", clock)
    monkeypatch.setattr(module, "available_cores", lambda: 2)
    monkeypatch.setenv("CONVTUNE_INFERENCE_LANES", "2")
    all_cores, make_lane = OnnxClassifier.probabilities, OnnxClassifier.probabilities_on_new_session
    lane_numbers = itertools.count()

    def probabilities(self: OnnxClassifier, pixels: np.ndarray) -> np.ndarray:
        return held.call("all cores", functools.partial(all_cores, self), pixels)

    def lane(self: OnnxClassifier, *, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        name = f"lane {next(lane_numbers)}"
        return functools.partial(held.call, name, make_lane(self, threads=threads))

    monkeypatch.setattr(OnnxClassifier, "probabilities", probabilities)
    monkeypatch.setattr(OnnxClassifier, "probabilities_on_new_session", lane)
    service = module.Convtune()
    assert service.tag == exported.tag
    monkeypatch.setattr(bentoml, "get_current_service", lambda: service)
    return InProcess(service, held, clock)


def predict(client: httpx.AsyncClient, path: Path) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(client.post("/predict", files={"image": image_file(path)}))


def test_a_request_queued_over_10_s_is_refused_with_a_503(
    in_process: InProcess, probe_images: list[Path], expected_results: list[dict]
) -> None:
    held, clock = in_process.held, in_process.clock

    async def scenario() -> list[httpx.Response]:
        async with in_process.client() as client:
            running = predict(client, probe_images[0])
            await until(lambda: held.started("all cores") == 1)
            stale = predict(client, probe_images[1])  # queued at 0 s
            await until(lambda: in_process.queued() == 1)
            clock.now = 5.0
            fresh = predict(client, probe_images[2])  # queued at 5 s
            await until(lambda: in_process.queued() == 2)
            clock.now = 10.5  # the stale one has waited 10.5 s, the fresh one 5.5 s
            held.release("all cores")
            return list(await asyncio.gather(running, stale, fresh))

    running, stale, fresh = asyncio.run(scenario())
    body = assert_json_error(stale, 503)
    assert body == {"error": "the service is overloaded (queued over 10 s); retry later"}
    assert stale.headers["x-request-id"]
    for response, expected in ((running, expected_results[0]), (fresh, expected_results[2])):
        assert response.status_code == 200, response.text
        assert_same_numbers(response.json(), expected)
    assert held.calls == [("all cores", 1), ("all cores", 1)]  # the stale one never ran


def test_under_load_queued_requests_run_in_the_lanes_side_by_side(
    in_process: InProcess, probe_images: list[Path], expected_results: list[dict]
) -> None:
    held = in_process.held
    service = in_process.service
    decoding = probe_images[3].read_bytes()
    decode, decode_may_finish = service.classifier.decode, threading.Event()

    def slow_decode(data: bytes, **options: Any) -> np.ndarray:
        if data == decoding:
            assert decode_may_finish.wait(BACKSTOP_S)
        return decode(data, **options)

    service.classifier.decode = slow_decode

    async def scenario() -> list[httpx.Response]:
        async with in_process.client() as client:
            lone = predict(client, probe_images[0])
            await until(lambda: held.started("all cores") == 1)  # alone: every core
            still_decoding = predict(client, probe_images[3])
            queued = [predict(client, path) for path in probe_images[1:3]]
            await until(lambda: in_process.queued() == 2)
            # A decode still runs when the lone request's call ends: the two queued requests
            # go to the two lanes, one each, which then run at the same time.
            held.release("all cores")
            await until(lambda: held.started("lane 0") == held.started("lane 1") == 1)
            held.release("lane")
            decode_may_finish.set()
            return list(await asyncio.gather(lone, *queued, still_decoding))

    responses = asyncio.run(scenario())
    for response, index in zip(responses, [0, 1, 2, 3], strict=True):
        assert response.status_code == 200, response.text
        assert_same_numbers(response.json(), expected_results[index])
    assert held.calls[0] == ("all cores", 1)
    assert sorted(held.calls[1:3]) == [("lane 0", 1), ("lane 1", 1)]
    assert len(held.calls) == 4  # the last one wherever it found room
