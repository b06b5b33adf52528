"""Benchmarks (not tests). Run `python -m bench` (all) or `python -m bench storage --rows 1000000`."""
