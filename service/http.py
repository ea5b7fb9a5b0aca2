"""The HTTP side of the service: limits, reading the multipart form, errors, the request log.

Shared by the routes (``service.routes``) and the service (``service.py``). Nothing here
imports the model or onnxruntime; it is plain Starlette, plus BentoML's trace context for
the request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

DEFAULT_TOP_K = 5
# The multipart field each route reads its files from.
FILE_FIELDS = {"/predict": "image", "/predict_batch": "images", "/explain": "image"}
ENV_PREFIX = "CONVTUNE_"
REQUEST_LOGGER = "convtune.requests"
MAX_FORM_FIELDS = 4  # text fields in a form: top_k, and room for a client's extras to refuse
MAX_BOUNDARY_PADDING = 64  # spaces or tabs after a multipart boundary (see BoundaryScan)


@dataclass(frozen=True)
class Limits:
    """What one request may send. Each field is read from ``CONVTUNE_<FIELD NAME>``."""

    max_batch_images: int = 64  # files in one request
    max_pixels: int = 40_000_000  # per image, checked from its header before decoding
    max_upload_bytes: int = 20 * 1024 * 1024  # the whole request body
    max_request_pixels: int = 160_000_000  # all the images of one request, from their headers
    # Enforced by the HTTP protocol, before the application (service.connections):
    max_url_bytes: int = 8 * 1024  # the request line: 414 over it
    max_header_bytes: int = 16 * 1024  # the request line and headers: 431 over it
    header_timeout_s: int = 10  # from connecting (or a kept-alive request's first byte)
    slow_body_grace_s: int = 10  # a body's first seconds, at any rate
    min_body_rate: int = 16 * 1024  # bytes/s a body must average after its grace: 408

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """The limits, with any set in ``environ``; a bad value stops the service at start."""
        values = {}
        for limit in fields(cls):
            name = ENV_PREFIX + limit.name.upper()
            if (text := environ.get(name)) is None:
                continue
            try:
                values[limit.name] = int(text)
            except ValueError:
                values[limit.name] = 0
            if values[limit.name] < 1:
                raise ValueError(f"{name} must be a positive integer, not {text!r}")
        return cls(**values)


class RequestError(Exception):
    """A request the service refuses: answered with ``status`` and a JSON ``{"error": ...}``.

    The message is written for a person; ``details`` add machine-readable fields (such as the
    index of the bad image in a batch).
    """

    status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details

    def response(self) -> JSONResponse:
        return JSONResponse({"error": str(self), **self.details}, status_code=self.status)


class BadRequest(RequestError):
    status = 400


class PayloadTooLarge(RequestError):
    status = 413


class Overloaded(RequestError):
    status = 503


def with_body_limit(request: Request, max_bytes: int) -> Request:
    """``request`` whose body may not exceed ``max_bytes``: PayloadTooLarge past that.

    A Content-Length over the limit is refused before a byte of the body is read, and a body
    without one (chunked) is counted as it arrives, so the multipart parser never holds or
    spools more than ``max_bytes`` of a request to memory or disk.
    """

    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is over the limit of {max_bytes:,} bytes "
            "(send fewer or smaller images)",
            limit_bytes=max_bytes,
        )

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large()
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise too_large()
        return message

    return Request(request.scope, receive)


class BoundaryScan:
    """Checks a multipart body's boundaries as it arrives, ahead of the parser.

    python-multipart walks some shapes one byte at a time in Python, on the event loop:
    spaces after a boundary (RFC 2046's "transport padding") and text that starts like a
    boundary but is not one cost it about a second per few MiB, while every other client
    waits. This scan finds each ``CRLF--boundary`` with ``bytes.find`` and refuses more of
    them than a request may have parts, and padding longer than ``MAX_BOUNDARY_PADDING``
    (no client sends any), so the parser only ever sees bodies it reads at C speed.
    """

    def __init__(self, boundary: bytes, *, max_parts: int) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._max_delimiters = max_parts + 1  # one before each part, one closing
        self._window = len(self._delimiter) + MAX_BOUNDARY_PADDING + 1
        self._tail = b"\r\n"  # the first boundary has no line break before it
        self._tail_offset = -2  # where ``_tail`` starts in the body
        self._last_seen = -3  # where the last delimiter counted starts
        self._delimiters = 0

    def feed(self, chunk: bytes) -> None:
        """Scan the next ``chunk`` of the body; BadRequest for a shape the parser walks."""
        data = self._tail + chunk
        found = data.find(self._delimiter)
        while found != -1:
            if self._tail_offset + found > self._last_seen:  # the tail is scanned twice
                self._last_seen = self._tail_offset + found
                self._delimiters += 1
                if self._delimiters > self._max_delimiters:
                    raise BadRequest(
                        f"the multipart body has more than {self._max_delimiters - 1} parts"
                    )
            after = found + len(self._delimiter)
            padding = data[after : after + MAX_BOUNDARY_PADDING + 1]
            if len(padding) - len(padding.lstrip(b" \t")) > MAX_BOUNDARY_PADDING:
                raise BadRequest(
                    "the multipart body has more than "
                    f"{MAX_BOUNDARY_PADDING} spaces after a boundary; send none"
                )
            found = data.find(self._delimiter, found + 1)
        self._tail = data[-self._window :]
        self._tail_offset += len(data) - len(self._tail)


def with_boundary_scan(request: Request, scan: BoundaryScan) -> Request:
    """``request`` whose body goes through ``scan`` as the form parser reads it."""

    async def receive() -> Message:
        message = await request.receive()
        if message["type"] == "http.request":
            scan.feed(message.get("body", b""))
        return message

    return Request(request.scope, receive)


@dataclass(frozen=True)
class Form:
    """A parsed upload: each file as (a name for messages, its bytes), ``top_k``, and the
    text fields the route reads besides (those sent)."""

    files: list[tuple[str, bytes]]
    top_k: int
    texts: Mapping[str, str] = field(default_factory=dict)


async def read_form(
    request: Request, file_field: str, limits: Limits, *, text_fields: tuple[str, ...] = ()
) -> Form:
    """The files of ``file_field``, ``top_k`` and any ``text_fields`` from a multipart body,
    or a RequestError.

    Only files are accepted in ``file_field``: text there (a URL, base64) is refused, never
    fetched or decoded.
    """
    # Read as Starlette's form parser reads it, so both agree on the type and its charset.
    media_type, parameters = parse_options_header(request.headers.get("content-type", ""))
    content_type = media_type.decode("latin-1")
    if content_type != "multipart/form-data":
        raise BadRequest(
            f"send multipart/form-data with the image in the file field {file_field!r} "
            f"(got {content_type or 'no content type'!r})"
        )
    request = with_body_limit(request, limits.max_upload_bytes)
    max_files = limits.max_batch_images
    if boundary := parameters.get(b"boundary"):  # none: the parser says so
        scan = BoundaryScan(boundary, max_parts=max_files + MAX_FORM_FIELDS)
        request = with_boundary_scan(request, scan)
    try:
        async with request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS) as form:
            unexpected = sorted(set(form.keys()) - {file_field, "top_k", *text_fields})
            if unexpected:
                raise BadRequest(f"unexpected field(s) {unexpected}; send files in {file_field!r}")
            uploads = form.getlist(file_field)
            if not uploads:
                raise BadRequest(f"missing the file field {file_field!r}")
            files = []
            for index, upload in enumerate(uploads):
                if not isinstance(upload, UploadFile):
                    raise BadRequest(
                        f"{file_field!r} must be a file upload, not text (URLs aren't fetched)"
                    )
                name = f"{file_field}[{index}] {(upload.filename or '')[:80]!r}"
                files.append((name, await upload.read()))
            texts = {name: parse_text(name, form.getlist(name)) for name in text_fields}
            return Form(
                files,
                parse_top_k(form.getlist("top_k")),
                {name: text for name, text in texts.items() if text is not None},
            )
    except UnicodeError as error:  # the charset parameter names a codec that cannot decode
        charset = parameters.get(b"charset", b"").decode("latin-1")
        raise BadRequest(
            f"the multipart body cannot be read: its charset {charset!r} decodes no text"
        ) from error
    except (HTTPException, MultiPartException) as error:
        detail = str(getattr(error, "detail", None) or getattr(error, "message", error))
        if detail.startswith("Too many files"):
            raise BadRequest(
                f"too many images: at most {max_files} per request", limit_images=max_files
            ) from error
        raise BadRequest(f"the multipart body cannot be read: {detail}") from error


def parse_top_k(values: list[Any]) -> int:
    """``top_k`` from the form: absent → the default; one positive integer; else BadRequest."""
    if not values:
        return DEFAULT_TOP_K
    if len(values) > 1:
        raise BadRequest(f"send top_k once (got {len(values)} values)")
    try:
        top_k = int(values[0])  # a file here: TypeError
    except (ValueError, TypeError):
        top_k = 0
    if top_k < 1:
        got = values[0][:20] if isinstance(values[0], str) else "a file"
        raise BadRequest(f"top_k must be a positive integer (got {got!r})")
    return top_k


def parse_text(name: str, values: list[Any]) -> str | None:
    """Text field ``name`` from the form: absent → None; sent once, as text; else BadRequest."""
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"send {name} once (got {len(values)} values)")
    if not isinstance(values[0], str):
        raise BadRequest(f"{name} must be text, not a file")
    return values[0]


def current_request_id() -> str:
    """BentoML's id of the request being served (as in its logs), else a fresh uuid4 hex."""
    try:
        from bentoml._internal.context import trace_context

        request_id = trace_context.request_id
    except ImportError:  # BentoML moved its internals: the id only loses its link to them
        request_id = None
    return format(request_id, "016x") if request_id else uuid.uuid4().hex


@dataclass
class RequestLogEntry:
    """One request as the log line reports it; the handler fills in ``images``."""

    route: str
    request_id: str = field(default_factory=current_request_id)
    images: int = 0
    status: int = 0
    error: str | None = None


Handler = Callable[[Request, RequestLogEntry], Awaitable[dict[str, Any] | Response]]


def json_endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Run ``handler``: its dict → 200 (JSON; a Response as it is), RequestError → its
    status, each with ``X-Request-ID``.

    Writes one JSON log line per request whatever happens, and answers an unexpected
    exception with a JSON 500 that carries the request id (the traceback goes to the log).
    """

    async def endpoint(request: Request) -> Response:
        log_entry = RequestLogEntry(route=request.url.path)
        started = time.perf_counter()
        try:
            answer = await handler(request, log_entry)
            response = answer if isinstance(answer, Response) else JSONResponse(answer)
        except RequestError as error:
            log_entry.error = str(error)
            response = error.response()
        except ClientDisconnect:
            log_entry.error = "the client disconnected"
            response = Response(status_code=499)  # nginx's "client closed request"; unsent
        except asyncio.CancelledError:
            # Only BentoML's TimeoutMiddleware cancels a request here, and it answers 504.
            log_entry.status, log_entry.error = 504, "timed out"
            write_request_log(log_entry, started)
            raise
        except Exception:
            # The traceback goes to BentoML's log: it is not a JSON line.
            log = logging.getLogger("bentoml.convtune")
            log.exception("request %s failed", log_entry.request_id)
            log_entry.error = "internal error"
            response = JSONResponse(
                {"error": f"internal error (request id {log_entry.request_id})"}, status_code=500
            )
        log_entry.status = response.status_code
        response.headers["X-Request-ID"] = log_entry.request_id
        write_request_log(log_entry, started)
        return response

    return endpoint


def write_request_log(log_entry: RequestLogEntry, started: float) -> None:
    """One JSON line for the request, timed from ``started`` (``time.perf_counter``)."""
    record = {
        "event": "request",
        "request_id": log_entry.request_id,
        "route": log_entry.route,
        "images": log_entry.images,
        "status": log_entry.status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if log_entry.error is not None:
        record["error"] = log_entry.error[:300]
    logging.getLogger(REQUEST_LOGGER).info(json.dumps(record))


def setup_request_log() -> logging.Logger:
    """Send the request log to stdout as bare JSON lines, next to BentoML's own log.

    Called when the service starts, after BentoML configured logging (which disables the
    loggers that exist by then); it has no prefix so that every line parses as JSON.
    """
    logger = logging.getLogger(REQUEST_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.disabled = False
    return logger
