"""Models: what a fine-tuned classifier is (a timm encoder with a new head, and where its
pretrained weights come from) and the artifact that carries it (its files, its manifest,
and running its ONNX graph).

Imports: ``convtune.data`` and third-party libraries, never ``training`` or ``service``.
The service imports the artifact and ONNX side of this package, which must therefore not
import torch or timm; so this ``__init__`` imports nothing, and each module is imported by
its full name.
"""
