"""float32 sums in exactly the order PyTorch's CPU kernel adds them.

Double quantization subtracts `offset = absmax.mean()` before quantizing the scales, so one last
bit of the offset can change codes. bitsandbytes takes that mean with torch on the CPU, which
sums in a fixed order (ATen's SumKernel: 8-lane vectors, 4-way ILP, a 4-level cascade of chunks,
then the lanes left to right). Reproducing that order with elementwise float32 adds (which no
backend reorders) makes our offset bit-identical to bitsandbytes' on every backend.
Matches torch single-threaded, and at any thread count for up to 32768 elements (torch's grain
size): above that a multi-threaded torch splits the sum per thread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlora_jax.format import ieee

_LANES = 8  # ATen compiles SumKernel for AVX2 only: Vectorized<float> has 8 lanes
_ILP = 4
_LEVELS = 4


def _seq_sum(x_LxS: jax.Array) -> jax.Array:
  """Left-to-right sum over axis 0, starting from 0.0, as a C loop `acc += x[i]` does."""
  zero = jnp.zeros(x_LxS.shape[1:], x_LxS.dtype)
  if x_LxS.shape[0] == 0:
    return zero
  return jax.lax.scan(lambda acc, row: (acc + row, None), zero, x_LxS)[0]


def _chunk_sums(x_LxS: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
  """Sums of the full chunks of `step` rows (each left to right), and of the rows left over."""
  full = x_LxS.shape[0] // step
  chunks = x_LxS[: full * step].reshape(full, step, *x_LxS.shape[1:])
  return _seq_sum(jnp.moveaxis(chunks, 1, 0)), _seq_sum(x_LxS[full * step:])


def _cascade(x_MxS: jax.Array) -> jax.Array:
  """ATen's multi_row_sum: chunked running sums whose chunk sums are summed in chunks again."""
  m = x_MxS.shape[0]
  ceil_log2 = (m - 1).bit_length() if m > 2 else 1
  step = 1 << max(4, ceil_log2 // _LEVELS)
  level1, acc0 = _chunk_sums(x_MxS, step)
  level2, acc1 = _chunk_sums(level1, step)
  level3, acc2 = _chunk_sums(level2, step)
  acc3 = _seq_sum(level3)
  return ((acc0 + acc1) + acc2) + acc3


def _row_sum(x_LxS: jax.Array) -> jax.Array:
  """ATen's row_sum: 4 interleaved cascades, the leftovers into the first, then combined."""
  length = x_LxS.shape[0]
  rows = length // _ILP
  partial = _cascade(x_LxS[: rows * _ILP].reshape(rows, _ILP, *x_LxS.shape[1:]))
  first = partial[0]
  for i in range(rows * _ILP, length):
    first = first + x_LxS[i]
  for k in range(1, _ILP):
    first = first + partial[k]
  return first


def torch_cpu_sum(x_N: jax.Array) -> jax.Array:
  """Sum of a 1-D float32 array, rounded exactly as `torch.sum` on the CPU (one thread)."""
  n = x_N.shape[0]
  if n < _LANES:
    return _row_sum(x_N)
  vecs = n // _LANES
  lanes = _row_sum(x_N[: vecs * _LANES].reshape(vecs, _LANES))
  total = jnp.float32(0)
  for i in range(vecs * _LANES, n):
    total = total + x_N[i]
  for k in range(_LANES):
    total = total + lanes[k]
  return total


def torch_cpu_mean(x_N: jax.Array) -> jax.Array:
  """`torch.mean` of a 1-D float32 array on the CPU: the sum above, then one division."""
  return ieee.divide(torch_cpu_sum(x_N), x_N.shape[0])  # XLA:GPU's own divide is not IEEE
