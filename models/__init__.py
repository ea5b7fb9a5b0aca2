"""Models: a timm encoder with a new classifier head, where pretrained weights come from,
the artifact format, and running an artifact's ONNX graph.

Imports: ``data`` and third-party libraries. ``models.artifact`` and ``models.inference``
are used by the service and must never import torch or timm, so this package imports
nothing on its own: ``create_model`` is ``convtune.models.factory.create_model``.
"""
