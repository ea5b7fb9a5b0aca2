"""Training: the fine-tuning recipe and its phases, calibration, evaluation and the report,
export into the model store, and the ``convtune`` command line.

Imports: ``data``, ``models``, torch, lightning, timm, bentoml. Nothing imports training.
"""
