"""``Convtune``: classify uploaded images with a convtune model from the BentoML store.

``POST /predict`` (multipart file ``image``) and ``POST /predict_batch`` (files ``images``),
both with an optional ``top_k`` [5], give the same numbers as ``convtune predict``, averaged
over the test-time views the artifact was exported to be served with (``--serve-tta``).
``POST /explain`` (one ``image``, an optional ``class``) adds what the network saw: the
class activation map and each stage's feature maps (``service.explain``). ``/ui`` is a web
page that calls these routes, ``/`` the API's Swagger page (``service.pages``).
They are routes of a small Starlette app mounted on the service, not ``@bentoml.api``
methods: BentoML's input handling fetches a URL sent as text in a file field and answers
some bad input with a 500. ``/docs.json`` and ``/schema.json`` (which BentoML's own
clients read) are BentoML's documents with these routes added. Limits, refusals (a 4xx
with ``{"error": "..."}``) and the one-JSON-line-per-request log are ``service.http``'s;
BentoML still provides the health probes, metrics and traffic limits (429, 504).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from convtune.data.images import ImageDecodeError, declared_pixels
from convtune.models.artifact import stored_model
from convtune.models.inference import VIEW_SETS, OnnxClassifier, format_prediction
from convtune.service.batching import GreedyBatcher, QueueTimeout, lane_layout
from convtune.service.client_schema import client_schema
from convtune.service.connections import serve_http_with_limits, set_connection_limits
from convtune.service.explain import (
    CLASS_FIELD,
    NotExplainable,
    checked_class,
    explain_image,
    explanation_json,
    overlay_png,
    wants_png,
)
from convtune.service.http import (
    FILE_FIELDS,
    BadRequest,
    Limits,
    Overloaded,
    PayloadTooLarge,
    RequestLogEntry,
    json_endpoint,
    read_form,
    setup_request_log,
)
from convtune.service.openapi import merged_spec
from convtune.service.pages import page_routes

MAX_BATCH_SIZE = 64  # inputs per onnxruntime call: images × test-time views
MAX_QUEUE_WAIT_S = 10.0  # a request queued longer than this is dropped with a 503
# Uploads up to this size decode in a few ms, little enough to do it while holding the idle
# model (requests arriving meanwhile wait for it); bigger ones decode on their own thread.
INLINE_DECODE_MAX_BYTES = 1 << 20
# ... and declare few pixels: a small file can declare 40 million, seconds of decoding
# (docs/benchmarks.md, "Hostile images").
INLINE_DECODE_MAX_PIXELS = 4_000_000
MODEL_ENV = "CONVTUNE_MODEL"
DEFAULT_MODEL = "convtune:latest"


def check_start(environ: Mapping[str, str] = os.environ) -> bentoml.Model:
    """The model to serve, once every ``CONVTUNE_*`` setting and the model have been read
    and checked as a worker reads them: a ValueError naming the setting or file otherwise.

    ``bentoml serve`` imports this module in its own process before it starts a worker,
    which runs this: a bad setting or model ends the start with the message and a non-zero
    status. Raised in a worker's ``__init__``, it would have BentoML restart the worker
    every few seconds, for ever. The model comes from the local store only: BentoML would
    look for a missing one on BentoCloud, an outbound request at start.
    """
    Limits.from_env(environ)
    lane_layout(os.cpu_count() or 1, environ)
    model = stored_model(environ.get(MODEL_ENV, DEFAULT_MODEL))
    OnnxClassifier(model.path, threads=1, tta=None)  # verified, its values and graph checked
    return model


def checked_start_or_exit() -> bentoml.Model:
    """:func:`check_start`, its error ending the process as one line on stderr."""
    try:
        return check_start()
    except ValueError as error:
        raise SystemExit(f"convtune service: error: {error}") from None


class RequestAbandoned(Exception):
    """Decoding stopped early: the request was cancelled and nobody waits for its images."""


async def predict(request: Request, log_entry: RequestLogEntry) -> dict[str, Any]:
    service = bentoml.get_current_service()
    form = await read_form(request, FILE_FIELDS["/predict"], service.limits)
    log_entry.images = len(form.files)
    if len(form.files) != 1:
        raise BadRequest(
            f"send exactly one file in {FILE_FIELDS['/predict']!r} (several: /predict_batch)"
        )
    [result] = await service.classify(form.files, form.top_k)
    return {"model": service.tag, **result}


async def predict_batch(request: Request, log_entry: RequestLogEntry) -> dict[str, Any]:
    service = bentoml.get_current_service()
    form = await read_form(request, FILE_FIELDS["/predict_batch"], service.limits)
    log_entry.images = len(form.files)
    return {"model": service.tag, "results": await service.classify(form.files, form.top_k)}


async def explain(request: Request, log_entry: RequestLogEntry) -> dict[str, Any] | Response:
    service = bentoml.get_current_service()
    service.check_explainable()
    field = FILE_FIELDS["/explain"]
    form = await read_form(request, field, service.limits, text_fields=(CLASS_FIELD,))
    log_entry.images = len(form.files)
    if len(form.files) != 1:
        raise BadRequest(f"send exactly one file in {field!r}")
    class_name = checked_class(form.texts.get(CLASS_FIELD), service.classifier.classes)
    png = wants_png(request.headers.get("accept", ""))
    answer = await service.explain(form.files[0], class_name=class_name, top_k=form.top_k, png=png)
    return answer if png else {"model": service.tag, **answer}


async def openapi_spec(_: Request) -> JSONResponse:
    """BentoML's /docs.json with this app's routes added (see ``service.openapi``)."""
    service = bentoml.get_current_service()
    return JSONResponse(_spec(service.limits, service.tag))


@functools.cache
def _spec(limits: Limits, model_tag: str) -> dict[str, Any]:
    return merged_spec(Convtune.openapi_spec.asdict(), limits, model_tag=model_tag)


async def bentoml_client_schema(_: Request) -> JSONResponse:
    """BentoML's /schema.json with this app's routes added (see ``service.client_schema``)."""
    return JSONResponse(_client_schema(bentoml.get_current_service().limits))


@functools.cache
def _client_schema(limits: Limits) -> dict[str, Any]:
    return client_schema(Convtune.schema(), limits)


app = Starlette(
    routes=[
        Route("/predict", json_endpoint(predict), methods=["POST"]),
        Route("/predict_batch", json_endpoint(predict_batch), methods=["POST"]),
        Route("/explain", json_endpoint(explain), methods=["POST"]),
        Route("/docs.json", openapi_spec, methods=["GET"]),
        Route("/schema.json", bentoml_client_schema, methods=["GET"]),
        *page_routes(),
    ]
)


class RoutedFirst:
    """ASGI middleware: requests for ``paths`` go to ``handler``, ahead of BentoML's routes."""

    def __init__(self, app: ASGIApp, *, paths: frozenset[str], handler: ASGIApp) -> None:
        self.app = app
        self.paths = paths
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)


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

    model = bentoml.models.BentoModel(checked_start_or_exit().tag)

    def __init__(self) -> None:
        self.limits = Limits.from_env()  # CONVTUNE_MAX_* and others: see service.http.Limits
        set_connection_limits(self.limits)  # before uvicorn accepts the first connection
        # Averaged over the test-time views the artifact was exported to be served with.
        self.classifier = OnnxClassifier(self.model.path, tta=None)
        self.tag = str(self.model.tag)
        cores = os.cpu_count() or 1
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
        # /explain runs the whole graph and draws PNGs: one image at a time, beside the
        # batcher, so a burst of them cannot take every core from /predict.
        self._explain_limiter = anyio.CapacityLimiter(1)
        setup_request_log()

    def _decoded(self, index: int, name: str, data: bytes) -> np.ndarray:
        """An upload as RGB, or a BadRequest naming it."""
        try:
            return self.classifier.decode(data, max_pixels=self.limits.max_pixels)
        except ImageDecodeError as error:
            raise BadRequest(f"{name}: {error}", index=index) from error

    def _pixels(self, uploads: list[tuple[str, bytes]], abandoned: threading.Event) -> np.ndarray:
        """The model's input for each upload, or a BadRequest naming the first bad one.

        Stops before the next image once ``abandoned`` is set: nobody waits for the rest.
        """
        images = []
        for index, (name, data) in enumerate(uploads):
            if abandoned.is_set():
                raise RequestAbandoned(f"stopped before {name}: the request was cancelled")
            images.append(self.classifier.preprocess(self._decoded(index, name, data)))
        return images[0][np.newaxis] if len(images) == 1 else np.stack(images)  # no copy of one

    async def classify(self, uploads: list[tuple[str, bytes]], top_k: int) -> list[dict]:
        """Decode, preprocess and run the model off the event loop, batched with others."""
        pixels = sum(
            declared_pixels(data, max_pixels=self.limits.max_pixels) for _, data in uploads
        )
        if pixels > self.limits.max_request_pixels:
            raise PayloadTooLarge(
                f"the images declare {pixels:,} pixels together, more than the limit of "
                f"{self.limits.max_request_pixels:,} per request; send fewer or smaller images"
            )
        small = sum(len(data) for _, data in uploads) <= INLINE_DECODE_MAX_BYTES
        abandoned = threading.Event()
        try:
            probabilities = await self._batcher(
                functools.partial(self._pixels, uploads, abandoned),
                inline=small and pixels <= INLINE_DECODE_MAX_PIXELS,
            )
        except asyncio.CancelledError:  # BentoML's timeout: its deadline has passed
            abandoned.set()
            raise
        except QueueTimeout as error:
            raise Overloaded(f"the service is overloaded ({error}); retry later") from error
        return [format_prediction(row, self.classifier.classes, top_k) for row in probabilities]

    def check_explainable(self) -> None:
        """Refuse /explain (409) for a model exported without the outputs it shows."""
        if self.classifier.manifest.explain is None:
            raise NotExplainable(
                f"the served model {self.tag} was exported without the feature maps /explain "
                "shows: re-export its run with this convtune (`convtune export RUN_DIR "
                "--name NAME`) and serve that model"
            )

    async def explain(
        self, upload: tuple[str, bytes], *, class_name: str | None, top_k: int, png: bool
    ) -> dict[str, Any] | Response:
        """``/explain``'s answer for one upload (``service.explain``), off the event loop."""

        def answer() -> dict[str, Any] | Response:
            rgb = self._decoded(0, *upload)
            explained = explain_image(self.classifier, rgb, class_name=class_name)
            if png:
                return overlay_png(rgb, explained)
            return explanation_json(self.classifier, rgb, explained, top_k=top_k)

        return await anyio.to_thread.run_sync(answer, limiter=self._explain_limiter)


Convtune.add_asgi_middleware(RoutedFirst, paths=frozenset({"/schema.json"}), handler=app)
# BentoML starts uvicorn without limits on headers, URLs or slow clients: see connections.
serve_http_with_limits()
