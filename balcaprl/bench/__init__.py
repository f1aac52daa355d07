"""Benchmarks; run ``python -m balcaprl.bench`` (see `balcaprl.bench.__main__`)."""
