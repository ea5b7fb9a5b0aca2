"""``Convtune``: classify uploaded images with a convtune model from the BentoML store.

``POST /predict`` (multipart file ``image``) and ``POST /predict_batch`` (files ``images``),
both with an optional ``top_k`` [5], give the same numbers as ``convtune predict``. They are
routes of a small Starlette app mounted on the service, not ``@bentoml.api`` methods: BentoML's
input handling fetches a URL sent as text in a file field and answers some bad input with a
500. Here uploads are decoded by ``data.images.decode_rgb`` and bad requests get a 400 with
``{"error": "..."}``; BentoML still provides the health probes, metrics, traffic limits and
(in-process) the adaptive batching.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import bentoml
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from data.images import ImageDecodeError, decode_rgb
from models.inference import OnnxClassifier, format_prediction

DEFAULT_TOP_K = 5
MAX_IMAGES = 64  # files per request, and images per onnxruntime call
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_LATENCY_MS = 10_000  # a request queued longer than this is dropped with a 503


class BadRequest(ValueError):
    """The request is wrong; the message tells the client how. Answered with 400."""


class Overloaded(RuntimeError):
    """The batching queue dropped the request. Answered with 503."""


def _overloaded() -> NoReturn:
    raise Overloaded("the service is overloaded; retry later")


async def _read_form(request: Request, field: str) -> tuple[list[tuple[str, bytes]], int]:
    """The files in ``field`` as (name for messages, bytes), and ``top_k``; or BadRequest."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise BadRequest(f"send multipart/form-data with the image in the file field {field!r}")
    try:
        async with request.form(max_files=MAX_IMAGES, max_fields=4) as form:
            unexpected = sorted(set(form.keys()) - {field, "top_k"})
            if unexpected:
                raise BadRequest(f"unexpected field(s) {unexpected}; send files in {field!r}")
            files = form.getlist(field)
            if not files:
                raise BadRequest(f"missing the file field {field!r}")
            uploads = []
            for index, file in enumerate(files):
                if not isinstance(file, UploadFile):
                    raise BadRequest(
                        f"{field!r} must be a file upload, not text (URLs aren't read)"
                    )
                if file.size is not None and file.size > MAX_FILE_BYTES:
                    raise BadRequest(f"{file.filename!r} is over {MAX_FILE_BYTES:,} bytes")
                uploads.append((f"{field}[{index}] {file.filename!r}", await file.read()))
            return uploads, _top_k(form.getlist("top_k"))
    except (HTTPException, MultiPartException) as error:
        detail = getattr(error, "detail", None) or getattr(error, "message", error)
        raise BadRequest(f"the multipart body cannot be read: {detail}") from error


def _top_k(values: list[Any]) -> int:
    if not values:
        return DEFAULT_TOP_K
    try:
        [text] = values
        top_k = int(text)  # a file here: TypeError
    except (ValueError, TypeError):
        top_k = 0
    if top_k < 1:
        got = values[0][:20] if isinstance(values[0], str) else "a file"
        raise BadRequest(f"top_k must be one positive integer (got {got!r})")
    return top_k


async def predict(request: Request, service: Any) -> dict[str, Any]:
    uploads, top_k = await _read_form(request, "image")
    if len(uploads) != 1:
        raise BadRequest("send exactly one file in 'image' (several: /predict_batch)")
    [result] = await service.classify(uploads, top_k)
    return {"model": service.tag, **result}


async def predict_batch(request: Request, service: Any) -> dict[str, Any]:
    uploads, top_k = await _read_form(request, "images")
    return {"model": service.tag, "results": await service.classify(uploads, top_k)}


Handler = Callable[[Request, Any], Awaitable[dict[str, Any]]]


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
    """``handler(request, service instance)`` → 200, BadRequest → 400, Overloaded → 503."""

    async def endpoint(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await handler(request, bentoml.get_current_service()))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        except Overloaded as error:
            return JSONResponse({"error": str(error)}, status_code=503)

    return endpoint


app = Starlette(
    routes=[
        Route("/predict", _endpoint(predict), methods=["POST"]),
        Route("/predict_batch", _endpoint(predict_batch), methods=["POST"]),
    ]
)


# BentoML appends mounted apps after its own routes, so /healthz, /readyz, /metrics and
# /docs.json stay BentoML's and this app answers /predict and /predict_batch.
@bentoml.asgi_app(app, path="/")
@bentoml.service(
    # One worker: onnxruntime already spreads one batch over every core, and a single
    # process holds one copy of the model and one batching queue (so, bigger batches).
    # Scale out with replicas instead.
    workers=1,
    traffic={"timeout": 30, "max_concurrency": 64},
)
class Convtune:
    """Image classifier: a convtune ONNX artifact run by onnxruntime."""

    model = bentoml.models.BentoModel(os.environ.get("CONVTUNE_MODEL", "convtune:latest"))

    def __init__(self) -> None:
        self.classifier = OnnxClassifier(self.model.path)
        self.tag = str(self.model.tag)
        # Adaptive batching with BentoML's own dispatcher (what `@bentoml.api(batchable=True)`
        # uses). Each queued item is one request's (n, 3, h, w) pixels; the dispatcher passes
        # the waiting items (at most MAX_IMAGES images, splitting an item if it must) to
        # `_infer` in one call, on a worker thread, and hands each caller its own (n, C)
        # rows. An item that waits over MAX_LATENCY_MS is dropped: `_overloaded` raises.
        self._dispatcher = CorkDispatcher(
            MAX_LATENCY_MS, MAX_IMAGES, fallback=_overloaded, get_batch_size=len, batch_dim=(0, 0)
        )
        self._probabilities = self._dispatcher(self._infer)

    def _infer(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        rows = self.classifier.probabilities(np.concatenate(batches))
        return np.split(rows, np.cumsum([len(batch) for batch in batches])[:-1])

    def _pixels(self, uploads: list[tuple[str, bytes]]) -> np.ndarray:
        images = []
        for name, data in uploads:
            try:
                images.append(self.classifier.preprocess(decode_rgb(data)))
            except ImageDecodeError as error:
                raise BadRequest(f"{name}: {error}") from error
        return np.stack(images)

    async def classify(self, uploads: list[tuple[str, bytes]], top_k: int) -> list[dict]:
        """Decode and preprocess off the event loop, then queue for a batched forward pass."""
        probabilities = await self._probabilities(await run_in_threadpool(self._pixels, uploads))
        return [format_prediction(row, self.classifier.classes, top_k) for row in probabilities]

    @bentoml.on_shutdown
    def stop_batching(self) -> None:
        self._dispatcher.shutdown()
