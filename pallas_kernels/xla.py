"""XLA's 4-bit matmul, the reference every kernel is checked against: dequantize, then one
compute-dtype dot with float32 accumulation. Also the dot helpers the layers share
(`compute_dot`, `precision_for`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from qlora_jax.format.quantization import QuantizedArray, dequantize


def frozen_weight(qw: QuantizedArray | jax.Array, compute_dtype) -> jax.Array:
  """The base weight [out, in] in the compute dtype: dequantized, or a dense (bf16) base as is.

  A dense array is the unquantized baseline (a bf16 base with the same layers, LoRA and step:
  scripts/quality.py's parity run); the Pallas backends hand it to this path too.
  """
  if isinstance(qw, QuantizedArray):
    return dequantize(qw, compute_dtype)
  return qw.astype(compute_dtype)


def precision_for(dtype) -> lax.Precision | None:
  """Float32 operands multiply in full float32 (HIGHEST); 16-bit ones need no flag.

  JAX's default lets a GPU take TF32 (10-bit mantissas) and a TPU bf16 passes for float32
  matmuls; a model run in float32 asks for float32, as torch computes it by default."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def compute_dot(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
  """einsum of a and b as compute_dtype operands, float32 accumulation, result in compute_dtype.

  A GPU's or TPU's bf16 matmul accumulates in float32 and rounds once as it writes, so the result
  is asked for in compute_dtype: a float32 result would be one more pass over [M, N] to convert
  (at 65B a measurable share of every layer: docs/kernels.md). XLA:CPU's fast bf16 matmul (AMX)
  is the float32-result one, so there the result is rounded after: the same numbers either way.
  """
  cd = jnp.dtype(compute_dtype)
  if jax.default_backend() == "gpu" and math.prod(a.shape[:-1]) == 1 and _keeps_rows(subscripts):
    return one_row_dot(subscripts, a, b, cd)
  return _einsum(subscripts, a, b, cd)


def _keeps_rows(subscripts: str) -> bool:
  """Whether a's row axes (all but its last) are axes of the result: one_row_dot's broadcast
  rows then stay apart (contracted, as in h^T @ dy, they would be summed 8 times)."""
  inputs, out = subscripts.replace(" ", "").split("->")
  rows = inputs.split(",")[0]
  rows = rows[:-1] if not rows.endswith("...") else rows[:-3]
  ellipsis = "..." in rows
  return all(c in out for c in rows.replace("...", "")) and (not ellipsis or "..." in out)


def _einsum(subscripts: str, a: jax.Array, b: jax.Array, cd: jnp.dtype) -> jax.Array:
  result = jnp.float32 if jax.default_backend() == "cpu" else cd
  return jnp.einsum(subscripts, a.astype(cd), b.astype(cd), preferred_element_type=result,
                    precision=precision_for(cd)).astype(cd)


def one_row_dot(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype, rows: int = 8):
  """compute_dot for an `a` of one row (batch-1 decoding: the LoRA products, 'xla' forward):
  the row broadcast to `rows` rows, the first row of the product kept.

  XLA's GPU simplifier rewrites a small vector x matrix dot into multiply + reduce: each product
  rounded to bf16, then a column reduction with little parallelism; an 8-row tensor-core product
  is faster (docs/BENCHMARKS.md, "Generation") and keeps the products exact (float32
  accumulation). A broadcast, not zero rows: XLA fuses it into the product, where a pad is a
  kernel of its own."""
  out = broadcast_dot(subscripts, a, b, compute_dtype, rows)
  return out[:1].reshape(*a.shape[:-1], *out.shape[1:])


def broadcast_dot(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype, rows: int = 8):
  """one_row_dot's whole product: `rows` equal rows [rows, ...] (a kernel that drops the rows
  past the first reads it in place: no slice kernel between)."""
  return _einsum(subscripts, jnp.broadcast_to(a.reshape(1, a.shape[-1]), (rows, a.shape[-1])), b,
                 jnp.dtype(compute_dtype))


def forward(x_MxK: jax.Array, qw: QuantizedArray, compute_dtype) -> jax.Array:
  """y [M, N] = x [M, K] @ dequant(qw [N, K])^T."""
  return compute_dot("mk,nk->mn", x_MxK, frozen_weight(qw, compute_dtype), compute_dtype)


def backward(dy_MxN: jax.Array, qw: QuantizedArray, compute_dtype) -> jax.Array:
  """dx [M, K] = dy [M, N] @ dequant(qw [N, K])."""
  return compute_dot("mn,nk->mk", dy_MxN, frozen_weight(qw, compute_dtype), compute_dtype)
