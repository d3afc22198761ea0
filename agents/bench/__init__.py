"""Benchmark suites: our agents and Stable-Baselines3 side by side, resumable, with committed
results (``scripts/benchmark.py``)."""
