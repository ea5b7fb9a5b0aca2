"""OpenAPI 3.0 description of ``/predict``, ``/predict_batch`` and ``/explain``, merged
into BentoML's, with this service's own ``info`` (the Swagger page's heading).

BentoML's ``/docs.json`` describes its ``@bentoml.api`` methods and the mounted apps only if
they are FastAPI; these routes belong to a plain Starlette app, so they are described here
by hand and the service serves the merged document at ``/docs.json`` (the Swagger UI at
``/`` reads it). The limits in the text are the ones the running service enforces.
"""

from __future__ import annotations

import copy
from typing import Any

from convtune.service.explain import CLASS_FIELD, HEATMAP_SIDE, OVERLAY_OPACITY, PNG_TYPE
from convtune.service.http import DEFAULT_TOP_K, FILE_FIELDS, Limits

SCHEMAS = "#/components/schemas/"
# The tag BentoML files its ``@bentoml.api`` routes under; ours go there too.
APP_TAG = "Service APIs"
BATCH_ROUTE = "/predict_batch"
EXPLAIN_ROUTE = "/explain"
_MODEL = {"type": "string", "description": "the served model, NAME:VERSION"}
_ACCEPTED = (
    "JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF, in any mode; converted to RGB as in "
    "training (transparency onto white, EXIF orientation applied)"
)


_SUMMARIES = {
    "/predict": "Classify one image",
    BATCH_ROUTE: "Classify several images",
    EXPLAIN_ROUTE: "Classify one image and show what the network saw",
}
_BASE64_PNG = {"type": "string", "format": "byte", "description": "a PNG file, base64"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _schemas(max_batch_images: int) -> dict[str, Any]:
    return {
        "ConvtunePrediction": _prediction_schema(),
        "ConvtuneSinglePrediction": {
            "allOf": [
                {"type": "object", "required": ["model"], "properties": {"model": _MODEL}},
                _ref("ConvtunePrediction"),
            ]
        },
        "ConvtuneBatchPrediction": {
            "type": "object",
            "required": ["model", "results"],
            "properties": {
                "model": _MODEL,
                "results": {
                    "type": "array",
                    "maxItems": max_batch_images,
                    "items": _ref("ConvtunePrediction"),
                    "description": "one prediction per uploaded file, in upload order",
                },
            },
        },
        "ConvtuneExplanation": _explanation_schema(),
        "ConvtuneError": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "what is wrong, for a person"},
                "index": {"type": "integer", "description": "the bad image's index in a batch"},
                "limit_bytes": {"type": "integer"},
                "limit_images": {"type": "integer"},
            },
        },
    }


def _prediction_schema() -> dict[str, Any]:
    """One image's answer, as ``models.inference.format_prediction`` builds it."""
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "type": "object",
        "required": ["label", "probabilities", "top_k"],
        "properties": {
            "label": {"type": "string", "description": "the most probable class"},
            "probabilities": {
                "type": "object",
                "additionalProperties": probability,
                "description": "every class → softmax(logits / temperature), averaged "
                "over the test-time views the model is served with (if any); sums to 1",
            },
            "top_k": {
                "type": "array",
                "description": "the top_k most probable classes, most probable first",
                "items": {
                    "type": "object",
                    "required": ["label", "probability"],
                    "properties": {"label": {"type": "string"}, "probability": probability},
                },
            },
        },
    }


def _explanation_schema() -> dict[str, Any]:
    """``/explain``'s JSON answer, as ``service.explain.explanation_json`` builds it."""
    size = {"type": "integer", "minimum": 1}
    stage = {
        "type": "object",
        "description": "one stage's volume of feature maps",
        "properties": {
            "name": {"type": "string"},
            "channels": size,
            "height": size,
            "width": size,
            "stride": {**size, "description": "input pixels between neighbouring cells"},
            "tiles": {
                "type": "object",
                "description": "every channel's map as a thumbnail (scaled to its own "
                "range), most active first, `columns` a row, in one PNG",
                "properties": {
                    "png": _BASE64_PNG,
                    "columns": size,
                    "tile_width": size,
                    "tile_height": size,
                    "channels": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "description": "the channel of each thumbnail, in sheet order",
                    },
                },
            },
        },
    }
    nullable_png = {**_BASE64_PNG, "nullable": True}
    explanation = {
        "type": "object",
        "required": [CLASS_FIELD, "overlay", "heatmap", "stages"],
        "properties": {
            CLASS_FIELD: {"type": "string", "description": "the class the map is for"},
            "overlay": {
                **nullable_png,
                "description": f"the class activation map over the image ({OVERLAY_OPACITY:.0%} "
                "opacity), the image's size; null without a map (see `map_unavailable`)",
            },
            "heatmap": {
                **nullable_png,
                "description": "the map alone in colour, the image's aspect ratio (at most "
                f"{HEATMAP_SIDE} pixels a side): to lay over the image at an opacity of your "
                "choice",
            },
            "map_unavailable": {"type": "string", "description": "why there is no map"},
            "stages": {"type": "array", "items": stage},
        },
    }
    return {"allOf": [_ref("ConvtuneSinglePrediction"), explanation]}


def _operation(route: str, limits: Limits) -> dict[str, Any]:
    """The OpenAPI path item of one of our routes."""
    form = form_schema(route, limits, file={"type": "string", "format": "binary"})
    return {
        "post": {
            "tags": [APP_TAG],
            "operationId": "Convtune__" + route.strip("/"),
            "summary": _SUMMARIES[route],
            "description": route_description(route, limits),
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
            "responses": _responses(route, limits),
        }
    }


def route_description(route: str, limits: Limits) -> str:
    """What ``route`` takes, for a person, in the limits the service enforces."""
    batch = route == BATCH_ROUTE
    count = f"up to {limits.max_batch_images} files" if batch else "one file"
    text = (
        f"Upload {count} in the multipart field `{FILE_FIELDS[route]}`: {_ACCEPTED}. The "
        f"whole body may be at most {limits.max_upload_bytes:,} bytes."
    )
    if route == EXPLAIN_ROUTE:
        text += (
            " Answers `/predict`'s fields plus the class activation map of the predicted "
            f"class (or the class named in `{CLASS_FIELD}`) over the image, and each encoder "
            "stage's feature maps as thumbnails, PNGs in base64; with `Accept: image/png`, "
            "the overlay PNG alone."
        )
    return text


def form_schema(route: str, limits: Limits, *, file: dict[str, Any]) -> dict[str, Any]:
    """The multipart form ``route`` reads, as a JSON Schema object with ``file`` for a file.

    Its readers type a file differently: OpenAPI as a binary string, BentoML's clients as
    ``{"type": "file"}``.
    """
    file_field = FILE_FIELDS[route]
    files = (
        {"type": "array", "items": file, "minItems": 1, "maxItems": limits.max_batch_images}
        if route == BATCH_ROUTE
        else file
    )
    top_k = {
        "type": "integer",
        "minimum": 1,
        "default": DEFAULT_TOP_K,
        "description": "how many classes to rank (capped at the number of classes)",
    }
    properties = {file_field: files, "top_k": top_k}
    if route == EXPLAIN_ROUTE:
        properties[CLASS_FIELD] = {
            "type": "string",
            "description": "the class to map (default: the predicted one)",
        }
    return {"type": "object", "required": [file_field], "properties": properties}


def _responses(route: str, limits: Limits) -> dict[str, Any]:
    error = _ref("ConvtuneError")
    answer = {
        "/predict": "ConvtuneSinglePrediction",
        BATCH_ROUTE: "ConvtuneBatchPrediction",
        EXPLAIN_ROUTE: "ConvtuneExplanation",
    }[route]
    responses = {
        "200": _json(
            _ref(answer),
            "the answer; the `X-Request-ID` header names the request in the log",
        ),
        "400": _json(error, _bad_request(route, limits)),
        "413": _json(error, "the request body is over the byte limit"),
        "429": _json(
            error, "too many requests in flight (BentoML's traffic.max_concurrency); retry"
        ),
        "503": _json(error, "the batching queue is overloaded; retry"),
        "504": _json(error, "not answered within BentoML's traffic.timeout"),
    }
    if route == EXPLAIN_ROUTE:
        responses["200"]["content"][PNG_TYPE] = {"schema": {"type": "string", "format": "binary"}}
        responses["409"] = _json(
            error,
            "the served model was exported without feature maps (re-export it), or with "
            "`Accept: image/png`, its head gives no class activation map",
        )
    return responses


def _bad_request(route: str, limits: Limits) -> str:
    """What a 400 answers, in the limits the service enforces."""
    text = (
        "not multipart/form-data; a missing, misnamed or extra field; text instead of a file "
        "(never fetched as a URL); an empty, non-image, corrupt, truncated or unsupported "
        f"file; an image over {limits.max_pixels:,} pixels; a top_k that is not one positive "
        "integer"
    )
    if route == EXPLAIN_ROUTE:
        text += f"; a `{CLASS_FIELD}` that is not one of the model's classes"
    if route == BATCH_ROUTE:
        text += (
            f"; more than {limits.max_batch_images} files. One bad image fails the whole "
            "request; the message and `index` name it"
        )
    return text


def service_info(model_tag: str, limits: Limits) -> dict[str, Any]:
    """The document's ``info``: what this service is, for the Swagger page at ``/``.

    BentoML's own is a template (its name and badges, a version of "None"); the version
    here is the served model's tag, which is what changes between deployments.
    """
    routes = "\n".join(
        f"- `POST {route}`: {_SUMMARIES[route].lower()} (multipart file field "
        f"`{FILE_FIELDS[route]}`)"
        for route in FILE_FIELDS
    )
    description = f"""\
Image classification with the convtune model `{model_tag}`, a fine-tuned convolutional \
network exported to ONNX and run by onnxruntime.

**Try it in a browser: [the web page at /ui](ui)** (choose, drop or paste an image).

{routes}
- `GET /ui`: the web page, which calls `/predict` and `/explain`
- `GET /healthz`, `GET /readyz`: liveness and readiness probes; `GET /metrics`: Prometheus
- `GET /docs.json`: this document; `GET /schema.json`: what BentoML's Python clients read

Images: {_ACCEPTED}; up to {limits.max_pixels:,} pixels each, {limits.max_batch_images} \
files and {limits.max_upload_bytes:,} bytes a request. Refusals answer a 4xx with \
`{{"error": "..."}}` saying what is wrong; every answer carries an `X-Request-ID` header \
that names the request in the service's log."""
    return {"title": "convtune image classifier", "version": model_tag, "description": description}


def merged_spec(bentoml_spec: dict[str, Any], limits: Limits, *, model_tag: str) -> dict[str, Any]:
    """``bentoml_spec`` (a dict) with this service's ``info`` and our routes added."""
    spec = copy.deepcopy(bentoml_spec)
    spec["info"] = service_info(model_tag, limits)
    spec["tags"] = [
        {**tag, "description": "Classify images with the served model."}
        if tag.get("name") == APP_TAG
        else tag
        for tag in spec.get("tags", [])
    ]
    spec.setdefault("paths", {}).update({route: _operation(route, limits) for route in FILE_FIELDS})
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {}).update(_schemas(limits.max_batch_images))
    return spec
