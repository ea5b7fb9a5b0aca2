"""Service: answer HTTP requests with an exported convtune model, run by onnxruntime.

``bentofile.yaml`` at the repository root packs it, with ``data`` and ``models``, into a
bento.

Imports: ``data.images``, ``data.preprocessing``, ``models.artifact``, ``models.inference``,
bentoml, onnxruntime, numpy and starlette only. Never torch, lightning or timm, not even
transitively at module level: the bento ships without them (a test enforces it).
"""
