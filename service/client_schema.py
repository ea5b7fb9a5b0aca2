"""``/schema.json``: BentoML's service schema with ``/predict`` and ``/predict_batch`` added.

BentoML's Python clients (``bentoml.SyncHTTPClient``, ``bentoml.AsyncHTTPClient``) read
this document, not ``/docs.json``: each of its ``routes`` becomes a method named after it,
the route's ``input`` properties its arguments. A property of type ``file`` (or an array
of them) makes the client send a multipart form, the files under the property's name and
every other argument as a JSON-encoded field (``top_k=3`` as ``3``): the form our routes
read. BentoML lists only ``@bentoml.api`` methods there, so this module adds ours.
"""

from __future__ import annotations

import copy
from typing import Any

from convtune.service.http import FILE_FIELDS, Limits
from convtune.service.openapi import form_schema, route_description

# How BentoML's schema types an image file argument (as for a ``PIL.Image`` parameter).
_IMAGE_FILE = {"type": "file", "format": "image"}
# A JSON object without listed properties: the client hands back the decoded body as is
# (with properties listed, it would keep only those).
_JSON_ANSWER = {"type": "object", "additionalProperties": True}


def _route(route: str, limits: Limits) -> dict[str, Any]:
    """``route`` as BentoML's schema describes an ``@bentoml.api`` method."""
    doc = route_description(route, limits)
    return {
        "name": route.strip("/"),
        "route": route,
        "description": doc,  # what BentoML writes
        "doc": doc,  # what its client reads (the method's docstring)
        "batchable": False,
        "input": form_schema(route, limits, file=_IMAGE_FILE),
        "output": _JSON_ANSWER,
        "is_task": False,
    }


def client_schema(bentoml_schema: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """``bentoml_schema`` (``Service.schema()``) with our routes added to its ``routes``."""
    schema = copy.deepcopy(bentoml_schema)
    schema.setdefault("routes", []).extend(_route(route, limits) for route in FILE_FIELDS)
    return schema
