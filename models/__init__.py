"""Models: a timm encoder with a new classifier head, where pretrained weights come from,
the artifact format, and running an artifact's ONNX graph.

Imports: ``data`` and third-party libraries. ``models.artifact`` and ``models.inference``
are used by the service and must never import torch or timm; ``create_model`` is loaded
lazily so that ``import models`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_model"]


def __getattr__(name: str) -> Any:
    if name == "create_model":
        from convtune.models.factory import create_model

        return create_model
    raise AttributeError(f"module 'models' has no attribute {name!r}")
