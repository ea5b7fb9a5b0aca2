"""``Convtune``: classify uploaded images with a convtune model from the BentoML store.

``POST /predict`` (multipart file ``image``) and ``POST /predict_batch`` (files ``images``),
both with an optional ``top_k`` [5], give the same numbers as ``convtune predict``, averaged
over the test-time views the artifact was exported to be served with (``--serve-tta``).
``POST /explain`` (one ``image``, an optional ``class``) adds what the network saw
(``service.explain``). The routes are a Starlette app mounted on the service
(``service.routes``); limits, refusals (a 4xx with ``{"error": "..."}``) and the
one-JSON-line-per-request log are ``service.http``'s. BentoML still provides the health
probes, metrics and traffic limits (429, 504).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from typing import Any

import anyio
import bentoml
from starlette.responses import Response

from convtune.models.inference import VIEW_SETS, OnnxClassifier, format_prediction
from convtune.service.batching import GreedyBatcher, QueueTimeout, lane_layout, spin_waits
from convtune.service.client_schema import client_schema
from convtune.service.connections import serve_http_with_limits, set_connection_limits
from convtune.service.cores import available_cores
from convtune.service.explain import explanation
from convtune.service.http import Limits, Overloaded, setup_request_log
from convtune.service.openapi import merged_spec
from convtune.service.routes import RoutedFirst, app
from convtune.service.startup import checked_start_or_exit
from convtune.service.uploads import Upload, decoded, decodes_inline, model_input, request_pixels

MAX_BATCH_SIZE = 64  # inputs per onnxruntime call: images × test-time views
MAX_QUEUE_WAIT_S = 10.0  # a request queued longer than this is dropped with a 503
MODEL_ENV = "CONVTUNE_MODEL"
DEFAULT_MODEL = "convtune:latest"


# BentoML puts mounted apps after its probe and metrics routes but before its /docs.json and
# index page: /healthz, /readyz and /metrics stay BentoML's, this app answers /predict,
# /predict_batch, /docs.json and the pages: / (Swagger UI, in place of BentoML's template
# page) and /ui (a test checks both).
# Its /schema.json comes before mounted apps: RoutedFirst (added below) sends it to this app.
@bentoml.asgi_app(app, path="/")
@bentoml.service(
    # One worker: its onnxruntime sessions already use every core (one call over all of
    # them when idle, lanes side by side under load), and one process has one batching
    # queue that schedules them. Scale out with replicas instead.
    workers=1,
    traffic={"timeout": 30, "max_concurrency": 64},
)
class Convtune:
    """Image classifier: a convtune ONNX artifact run by onnxruntime."""

    model = bentoml.models.BentoModel(
        checked_start_or_exit(os.environ.get(MODEL_ENV, DEFAULT_MODEL)).tag
    )

    def __init__(self) -> None:
        self.limits = Limits.from_env()  # CONVTUNE_MAX_* and others: see service.http.Limits
        set_connection_limits(self.limits)  # before uvicorn accepts the first connection
        cores = available_cores()  # a container's CPU limit, not its node's cores
        # Averaged over the test-time views the artifact was exported to be served with.
        self.classifier = OnnxClassifier(
            self.model.path, threads=cores, tta=None, spin_waits=spin_waits()
        )
        self.tag = str(self.model.tag)
        # Lanes: sessions of their own with a thread or a few, side by side under load.
        lane_count, threads_per_lane = lane_layout(cores)
        self._batcher = GreedyBatcher(
            self.classifier.probabilities,
            lanes=[
                self.classifier.probabilities_on_new_session(threads=threads_per_lane)
                for _ in range(lane_count)
            ],
            # Fewer images per call with views, so calls hold no more inputs than without.
            max_batch_size=max(1, MAX_BATCH_SIZE // len(VIEW_SETS[self.classifier.tta])),
            max_wait_s=MAX_QUEUE_WAIT_S,
            # Decoding is CPU-bound and a big image takes hundreds of MB while it decodes:
            # as many at once as there are cores, not one per thread of the pool (40).
            prepare_limiter=anyio.CapacityLimiter(cores),
        )
        # /explain runs the explaining graph and draws PNGs: one image at a time, beside the
        # batcher, so a burst of them cannot take every core from /predict.
        self._explain_limiter = anyio.CapacityLimiter(1)
        setup_request_log()

    @functools.cached_property
    def openapi_document(self) -> dict[str, Any]:
        """BentoML's /docs.json with the routes added (``service.openapi``)."""
        return merged_spec(Convtune.openapi_spec.asdict(), self.limits, model_tag=self.tag)

    @functools.cached_property
    def client_schema_document(self) -> dict[str, Any]:
        """BentoML's /schema.json with the routes added (``service.client_schema``)."""
        return client_schema(Convtune.schema(), self.limits)

    async def classify(self, uploads: list[Upload], top_k: int) -> list[dict]:
        """Decode, preprocess and run the model off the event loop, batched with others."""
        pixels = request_pixels(uploads, self.limits)
        abandoned = threading.Event()
        prepare = functools.partial(
            model_input, self.classifier, uploads, abandoned, max_pixels=self.limits.max_pixels
        )
        try:
            probabilities = await self._batcher(prepare, inline=decodes_inline(uploads, pixels))
        except asyncio.CancelledError:  # BentoML's timeout: its deadline has passed
            abandoned.set()
            raise
        except QueueTimeout as error:
            raise Overloaded(f"the service is overloaded ({error}); retry later") from error
        return [format_prediction(row, self.classifier.classes, top_k) for row in probabilities]

    async def explain(
        self, upload: Upload, *, class_name: str | None, top_k: int, png: bool
    ) -> dict[str, Any] | Response:
        """``/explain``'s answer for one upload (``service.explain``), off the event loop."""

        def answer() -> dict[str, Any] | Response:
            rgb = decoded(self.classifier, 0, *upload, max_pixels=self.limits.max_pixels)
            return explanation(self.classifier, rgb, class_name=class_name, top_k=top_k, png=png)

        return await anyio.to_thread.run_sync(answer, limiter=self._explain_limiter)


Convtune.add_asgi_middleware(RoutedFirst, paths=frozenset({"/schema.json"}), handler=app)
# BentoML starts uvicorn without limits on headers, URLs or slow clients: see connections.
serve_http_with_limits()
