"""Training: turn labelled images into a calibrated, verified artifact in the model store,
and the ``convtune`` command line that drives it and evaluates the result.

Imports: ``convtune.data``, ``convtune.models``, torch, lightning, timm, bentoml. No other
convtune package imports it (the service runs without it); the benchmarks do.
"""
