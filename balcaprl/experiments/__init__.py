"""Experiments built on the library: the demo (`demo`), the reproduction study (`reproduce`), the GPU smoke test
(`gpu_smoke`). The library never imports them (`tests/test_layering.py`); the ``balcaprl`` CLI and ``make`` run them.
"""
