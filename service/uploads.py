"""From a request's uploads to the model's input: the pixels the request may decode, where
it decodes, and each upload decoded (a BadRequest naming the bad one)."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np

from convtune.data.images import ImageDecodeError, declared_pixels
from convtune.models.inference import OnnxClassifier
from convtune.service.http import REQUEST_LOGGER, BadRequest, Limits, PayloadTooLarge

Upload = tuple[str, bytes]  # a file's name and its bytes
# Uploads up to this size decode in a few ms, little enough to do it while holding the idle
# model (requests arriving meanwhile wait for it); bigger ones decode on their own thread.
INLINE_DECODE_MAX_BYTES = 1 << 20
# ... and declare few pixels: a small file can declare 40 million, seconds of decoding
# (docs/benchmarks.md, "Hostile images").
INLINE_DECODE_MAX_PIXELS = 4_000_000


class RequestAbandoned(Exception):
    """Decoding stopped early: the request was cancelled and nobody waits for its images."""


def request_pixels(uploads: list[Upload], limits: Limits) -> int:
    """The pixels the uploads' headers declare together, or a PayloadTooLarge over
    ``limits.max_request_pixels``."""
    pixels = sum(declared_pixels(data, max_pixels=limits.max_pixels) for _, data in uploads)
    if pixels > limits.max_request_pixels:
        raise PayloadTooLarge(
            f"the images declare {pixels:,} pixels together, more than the limit of "
            f"{limits.max_request_pixels:,} per request; send fewer or smaller images"
        )
    return pixels


def decodes_inline(uploads: list[Upload], pixels: int) -> bool:
    """Whether the uploads are cheap enough to decode inside an idle model's call."""
    small = sum(len(data) for _, data in uploads) <= INLINE_DECODE_MAX_BYTES
    return small and pixels <= INLINE_DECODE_MAX_PIXELS


def decoded(
    classifier: OnnxClassifier, index: int, name: str, data: bytes, *, max_pixels: int
) -> np.ndarray:
    """An upload as RGB, or a BadRequest naming it."""
    try:
        return classifier.decode(data, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise BadRequest(f"{name}: {error}", index=index) from error


def model_input(
    classifier: OnnxClassifier,
    uploads: list[Upload],
    abandoned: threading.Event,
    *,
    max_pixels: int,
) -> np.ndarray:
    """The model's input for each upload, or a BadRequest naming the first bad one.

    Stops before the next image once ``abandoned`` is set: nobody waits for the rest. The
    request log says so, since the request's own line was written when it was cancelled.
    """
    images = []
    for index, (name, data) in enumerate(uploads):
        if abandoned.is_set():
            record = {"event": "decoding stopped", "decoded": index, "images": len(uploads)}
            logging.getLogger(REQUEST_LOGGER).info(json.dumps(record))
            raise RequestAbandoned(f"stopped before {name}: the request was cancelled")
        rgb = decoded(classifier, index, name, data, max_pixels=max_pixels)
        images.append(classifier.preprocess(rgb))
    return images[0][np.newaxis] if len(images) == 1 else np.stack(images)  # no copy of one
