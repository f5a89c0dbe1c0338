"""Shared test helpers."""

import importlib.util

import pytest


def has(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


needs_bnb = pytest.mark.skipif(not (has("torch") and has("bitsandbytes")),
                               reason="needs torch (CPU) and bitsandbytes: pip install -e .[test]")
