"""Service: answer HTTP requests with an exported convtune model, run by onnxruntime.

The BentoML service is ``service.service:Convtune``; ``bentofile.yaml`` at the repository
root packs this package, with ``data`` and ``models``, into a bento.

Imports: ``data.images``, ``data.preprocessing``, ``models.artifact``, ``models.cam``,
``models.inference``, bentoml (with its starlette and uvicorn), onnxruntime, numpy and
OpenCV only. Never torch, lightning or timm, not even transitively at module level: the
bento ships without them (a test enforces it).
"""
