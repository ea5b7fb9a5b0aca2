"""Service: answer HTTP requests with an exported convtune model, run by onnxruntime.

``service.py`` is the BentoML service (the model, batching, the answers), ``routes.py`` its
HTTP routes; ``bentofile.yaml`` at the repository root packs the package, with ``data`` and
``models``, into a bento.

Imports: ``data.images``, ``data.preprocessing``, ``models.artifact``, ``models.cam``,
``models.inference``, bentoml (with its starlette and uvicorn), onnxruntime, numpy and
OpenCV only. Never torch, lightning or timm, not even
transitively at module level: the bento ships without them (a test enforces it).
"""
