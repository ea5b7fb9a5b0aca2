"""Benchmarks a user runs from a source checkout: ``convtune bench serve`` and ``convtune bench
train`` (:mod:`~convtune.benchmarks.cli`), and the HTTP load generator
(``python -m convtune.benchmarks.loadgen``).

Developer tooling, not in the wheel: it may import every other package and needs the dev
extra; nothing imports it except the CLI's ``bench`` command and the tests. Figures and how
to read them: docs/benchmarks.md.
"""
