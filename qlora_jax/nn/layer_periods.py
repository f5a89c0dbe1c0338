"""Scanning layers of two kinds (Gemma 2 / 3: sliding-window and full attention) by periods of
their layer pattern, so that each layer's kind is static.

A scan over single layers sees each layer's kind as a traced value: the layers must then carry
their windows in explicit [B, T, T] masks and pick their rotation per iteration. Stepping over a
period of the pattern instead (Gemma 2: 2 layers, Gemma 3: 6) unrolls the period inside the scan
body, so every layer knows its kind when traced and a row of one sequence needs no mask at all:
the local layers take the causal kernel with a static window (cuDNN's sliding-window kernel),
the full ones the plain causal kernel. Each layer stays its own remat unit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def pattern_period(kinds: tuple[bool, ...]) -> int | None:
  """The length of the repeating unit of the layer kinds, when the layers are whole repeats of
  it; None without kinds."""
  n = len(kinds)
  if not n:
    return None
  return next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))


def scan_by_period(layers: nnx.Module, kinds: tuple[bool, ...], h, cos, sin, window: int, policy,
                   unroll: int = 1):
  """h through the stacked layers ([L, ...] variables), one scan step per period of `kinds`:
  layer(h, cos, sin, None, None, window if local else None, local) with `local` static."""
  period = pattern_period(kinds)
  graphdef, rng, rest = nnx.split(layers, nnx.RngState, ...)
  group = lambda x: x.reshape(x.shape[0] // period, period, *x.shape[1:])  # noqa: E731
  rng, rest = jax.tree.map(group, (rng, rest))

  def run_layer(local, rng_j, rest_j, h):
    layer = nnx.merge(graphdef, rng_j, rest_j)
    h = layer(h, cos, sin, None, None, window if local else None, local)[0]
    return h, nnx.state(layer, nnx.RngState)

  def body(h, xs):
    rngs = []
    for j, local in enumerate(kinds[:period]):
      fn = functools.partial(run_layer, local)
      if policy is not None:
        fn = jax.checkpoint(fn, policy=policy)
      h, rng_j = fn(*jax.tree.map(lambda x: x[j], xs), h)
      rngs.append(rng_j)
    return h, jax.tree.map(lambda *x: jnp.stack(x), *rngs)

  h, rng = jax.lax.scan(body, h, (rng, rest), unroll=unroll)
  nnx.update(layers, jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), rng))
  return h
