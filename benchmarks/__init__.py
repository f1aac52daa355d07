"""Benchmarks; run ``python -m benchmarks`` (see `benchmarks.__main__`)."""
