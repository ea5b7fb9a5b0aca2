"""The checks ``bentoml serve`` makes before it starts a worker: a bad setting or model ends
the start with one line on stderr and a non-zero status.

Raised in a worker's ``__init__``, the same error would have BentoML restart the worker
every few seconds, for ever.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import bentoml

from convtune.models.artifact import stored_model
from convtune.models.inference import OnnxClassifier
from convtune.service.batching import lane_layout
from convtune.service.cores import available_cores
from convtune.service.http import Limits


def check_start(reference: str, environ: Mapping[str, str] = os.environ) -> bentoml.Model:
    """Model ``reference`` (``NAME[:VERSION]``) of the local store, once it and every
    ``CONVTUNE_*`` setting have been read and checked as a worker reads them: a ValueError
    naming the setting or file otherwise.

    Only the local store: BentoML would look for a missing model on BentoCloud, an outbound
    request at start.
    """
    Limits.from_env(environ)
    lane_layout(available_cores(), environ)
    model = stored_model(reference)
    OnnxClassifier(model.path, threads=1, tta=None)  # verified, its values and graph checked
    return model


def checked_start_or_exit(reference: str) -> bentoml.Model:
    """:func:`check_start`, its error ending the process as one line on stderr."""
    try:
        return check_start(reference)
    except ValueError as error:
        raise SystemExit(f"convtune service: error: {error}") from None
