"""Walking a traced program: every equation of a jaxpr and of the jaxprs nested in its equations'
parameters (jit, scan, cond, custom VJPs, kernels), for tests that count or inspect primitives."""

from __future__ import annotations

from collections.abc import Iterator

from jax.extend import core


def equations(jaxpr) -> Iterator:
  """Each equation of jaxpr (a Jaxpr or ClosedJaxpr), then, depth first, those nested in it."""
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
          yield from equations(sub)
