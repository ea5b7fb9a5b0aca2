"""HTTP limits below the application: what a connection may do before a request reaches it.

BentoML runs uvicorn with httptools and passes it no limits on the request line, the
headers or the time they take: a client could send headers without end, or a byte now and
then for ever. Nor does the application see a request before its headers are complete.
So these limits live in the HTTP protocol itself: ``LimitedHttpToolsProtocol`` is
uvicorn's httptools protocol with

- a request line over ``max_url_bytes``: 414; a head over ``max_header_bytes``: 431;
- a head not complete ``header_timeout_s`` after the connection opened (or, on a kept-alive
  connection, after its first byte): 408, and the connection closed;
- a body read whole before the request goes to the application, where it would take one
  of BentoML's ``max_concurrency`` slots: a client that sends slowly holds a connection,
  never a slot. A body must keep arriving at ``min_body_rate`` bytes/s on average once its
  first ``slow_body_grace_s`` seconds have passed: 408 otherwise. A body declared over
  ``max_upload_bytes`` (or a chunked one that grows past it) goes to the application at
  once, which refuses it (413) without reading it all.

Refusals are JSON ``{"error": ...}`` like the application's, and close the connection.
"""

from __future__ import annotations

import json
from typing import ClassVar

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from convtune.service.http import Limits

# Probes and metrics answer at once, whatever a client sends with them.
UNBUFFERED_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})


def serve_http_with_limits() -> None:
    """Make the uvicorn that BentoML starts in this process use ``LimitedHttpToolsProtocol``.

    BentoML builds uvicorn's config itself, with ``http="auto"``; uvicorn looks that name up
    in its table when the server starts, after the service's module was imported (call this
    there) and before the service is made (which calls ``set_connection_limits``).
    """
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{LimitedHttpToolsProtocol.__name__}"


def set_connection_limits(limits: Limits) -> None:
    """The limits every connection gets from now on (uvicorn makes the protocol objects)."""
    LimitedHttpToolsProtocol.limits = limits


class RequestHeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head over its limits."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring."""

    limits: ClassVar[Limits] = Limits()

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        self._head_timer = None
        self._body_timer = None
        self._buffering: RequestResponseCycle | None = None  # its body is being read
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    # The head: its size and how long it takes.

    def _start_head(self) -> None:
        self._reading_head = True
        self._head_bytes = 0  # as received, for a head that is still arriving
        self._header_bytes = 0  # as parsed
        self._refusal: tuple[int, str] | None = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._refuse, 408,
                f"the request's headers did not arrive within {self.limits.header_timeout_s} s",
            )  # fmt: skip

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_head and not self.transport.is_closing():
            self._head_bytes += len(data)  # a head still incomplete: never buffer more
            if refusal := self._oversized(self._head_bytes):
                self._refuse(*refusal)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._refusal = self._oversized(len(self.url) + self._header_bytes)
        if self._refusal is not None:
            # Stops the parser; uvicorn answers a parser error with send_400_response.
            raise RequestHeadRefused(self._refusal[1])
        super().on_headers_complete()

    def _oversized(self, head_bytes: int) -> tuple[int, str] | None:
        """(414 or 431, why) when the head is over its limits, else None."""
        if len(getattr(self, "url", b"")) > self.limits.max_url_bytes:
            return 414, f"the URL is over {self.limits.max_url_bytes:,} bytes"
        if head_bytes > self.limits.max_header_bytes:
            return 431, f"the request's headers are over {self.limits.max_header_bytes:,} bytes"
        return None

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    # The body: read whole before the application sees the request.

    def _start_asgi_task(self, cycle: RequestResponseCycle, app) -> None:  # type: ignore[no-untyped-def]
        if cycle is self.cycle and cycle.more_body and self._body_to_buffer():
            self._buffering, self._buffered_app = cycle, app
            self._body_started = self.loop.time()
            self._body_bytes = 0
            if cycle.waiting_for_100_continue:  # the client waits for this to send the body
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                cycle.waiting_for_100_continue = False
            self._schedule_body_check()
            return
        super()._start_asgi_task(cycle, app)

    def _body_to_buffer(self) -> bool:
        """Whether this request has a body to read before the application sees it."""
        if self.scope["path"] in UNBUFFERED_PATHS:
            return False
        headers = dict(self.headers)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit():
            return 0 < int(declared) <= self.limits.max_upload_bytes
        return b"transfer-encoding" in headers

    def on_body(self, body: bytes) -> None:
        if self._buffering is None:
            return super().on_body(body)
        self._buffering.body += body  # no pause: the whole body is wanted now
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_upload_bytes:  # chunked: the app answers 413
            self._hand_over()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._buffering is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        """The buffered request goes to the application."""
        cycle, self._buffering = self._buffering, None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        cycle.message_event.set()  # what is buffered is there to receive
        super()._start_asgi_task(cycle, self._buffered_app)

    def _schedule_body_check(self) -> None:
        """Check the body's rate when it would next fall behind at the current count."""
        behind = self._body_bytes / self.limits.min_body_rate + self.limits.slow_body_grace_s
        due = self._body_started + behind
        self._body_timer = self.loop.call_at(max(due, self.loop.time()) + 0.01, self._check_body)

    def _check_body(self) -> None:
        self._body_timer = None
        if self._buffering is None:
            return
        elapsed = self.loop.time() - self._body_started - self.limits.slow_body_grace_s
        if self._body_bytes < self.limits.min_body_rate * elapsed:
            self._refuse(
                408,
                f"the request body arrived slower than {self.limits.min_body_rate:,} bytes/s",
            )
        else:
            self._schedule_body_check()

    # Refusals.

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close the connection."""
        self._stop_timers()
        self._buffering = None
        if self.transport.is_closing():
            return
        body = json.dumps({"error": message}).encode()
        reason = {408: b"Request Timeout", 414: b"URI Too Long",
                  431: b"Request Header Fields Too Large"}[status]  # fmt: skip
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()
        self.logger.warning("refused a request: %d %s", status, message)

    def _stop_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
