"""The BentoML service that serves an exported convtune model over HTTP.

What lives here: ``service.service`` (the ``Convtune`` BentoML service: ``POST /predict``
and ``POST /predict_batch``), ``service.batching`` (which schedules requests onto the
onnxruntime sessions), ``service.http`` (limits, forms, errors, the request log) and
``service.openapi`` (the routes' OpenAPI spec).
``bentofile.yaml`` at the repository root packs it, with ``data`` and ``models``, into a bento.

Imports: ``data.images``, ``data.transforms``, ``models.artifact``, ``models.inference``,
bentoml, onnxruntime, numpy and starlette only. Never torch, lightning or timm, not even
transitively at module level: the bento ships without them.
"""
