"""Load and serving benchmarks, run by hand (``python -m benchmarks.loadgen``) or by tests."""
