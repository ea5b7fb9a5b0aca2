"""The training recipe, its callbacks, export, and the ``convtune`` command line.

What lives here: ``training.config`` (the resolved run configuration), ``training.module``
(the LightningModule: loss, optimiser, schedule, metrics), ``training.callbacks`` (the
frozen-encoder phase), ``training.fit`` (one run end to end), ``training.export`` (ONNX +
manifest into the BentoML store), ``training.evaluate`` and ``training.cli``.

Imports: ``data``, ``models``, torch, lightning, timm, bentoml. Nothing imports training.
"""
