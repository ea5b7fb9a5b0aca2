"""The training recipe, its callbacks, export, and the ``convtune`` command line.

What lives here: ``training.config`` (the resolved run configuration), ``training.module``
(the LightningModule: loss, optimiser, schedule, metrics), ``training.callbacks`` (the
frozen-encoder phase), ``training.probe`` (that phase as a linear probe on cached
features), ``training.calibration`` (temperature scaling, ECE, NLL), ``training.fit`` (one
run end to end), ``training.evaluate`` and ``training.report`` (metrics and the HTML
report), ``training.export`` (ONNX + manifest into the BentoML store) and ``training.cli``.

Imports: ``data``, ``models``, torch, lightning, timm, bentoml. Nothing imports training.
"""
