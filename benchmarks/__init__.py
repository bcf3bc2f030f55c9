"""Benchmarks of the runtime: the suite (`python -m benchmarks`) and the two-backend script."""
