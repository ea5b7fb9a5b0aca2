"""The service's HTTP routes: a small Starlette ``app`` that ``service.py`` mounts on it.

They are routes, not ``@bentoml.api`` methods: BentoML's input handling fetches a URL sent
as text in a file field and answers some bad input with a 500. Each handler reads the form
(``service.http``) and calls the running service (``bentoml.get_current_service()``), so
this module does not import ``service.py``. ``/docs.json`` and ``/schema.json`` (which
BentoML's own clients read) are BentoML's documents with these routes added; ``/`` and
``/ui`` are the pages (``service.pages``).
"""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from convtune.service.explain import CLASS_FIELD, check_explainable, checked_class, wants_png
from convtune.service.http import (
    FILE_FIELDS,
    BadRequest,
    RequestLogEntry,
    json_endpoint,
    read_form,
)
from convtune.service.pages import page_routes


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
    check_explainable(service.classifier, service.tag)
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
    return JSONResponse(bentoml.get_current_service().openapi_document)


async def bentoml_client_schema(_: Request) -> JSONResponse:
    """BentoML's /schema.json with this app's routes added (see ``service.client_schema``)."""
    return JSONResponse(bentoml.get_current_service().client_schema_document)


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
