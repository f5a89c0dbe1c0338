"""Benchmarks (run as scripts: `python bench/<name>.py`); shared helpers in common.py."""
