"""Benchmarks: ``convtune bench serve`` (``serve.py``), ``convtune bench train`` (``train.py``),
the HTTP load generator (``loadgen.py``), the naive FastAPI peer (``naive_peer.py``) and the
server runner the tests share (``servers.py``).

May import every other package; nothing imports this one except the CLI's ``bench``
command and the tests. Figures and how to read them: docs/benchmarks.md.
"""
