"""Benchmarks of fedfms_jax against the PyTorch reference, side by side in one run
(`python -m bench.run --quick`; see bench/run.py). Not collected by pytest: the tests
live in tests/ (tests/test_bench.py runs the smallest plan)."""
