"""The frozen 4-bit experts' matmul: rows grouped by expert, each group times its expert's weight.

  y[r] = x[r] @ dequant(W[e])^T   for the rows r of group e (rows sorted by expert, group_sizes[e]
                                  of them, in expert order; rows past the groups' total get 0)

W is one QuantizedArray [experts, out, in] (NF4/FP4 blocks over the flattened tensor, each
expert's blocks contiguous). The product is one grouped matmul over the dequantized experts
(pallas_kernels/grouped.py: JAX's Hopper grouped-GEMM kernels on a GPU, `jax.lax.ragged_dot`
elsewhere): neither a loop over experts nor every token through every expert, and no token
dropped. Behind one custom VJP like the dense 4-bit matmul (qmatmul.py): the backward
returns dX = dY @ dequant(W[e]) per group and nothing for the frozen weight or the group sizes,
and keeps nothing but the quantized weight and the sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped import ragged_contraction, ragged_rows
from qlora_jax.format.quantization import QuantizedArray, dequantize


def grouped_qmatmul(x: jax.Array, qw: QuantizedArray, group_sizes: jax.Array,
                    compute_dtype=jnp.bfloat16) -> jax.Array:
  """y [M, out] in compute_dtype for x [M, in] sorted by expert; group_sizes int32 [experts]."""
  if len(qw.shape) != 3:
    raise ValueError(f"grouped_qmatmul takes experts' weights [experts, out, in], got shape {qw.shape}")
  if x.ndim != 2 or x.shape[1] != qw.shape[2]:
    raise ValueError(f"x must be [rows, {qw.shape[2]}], got {x.shape}")
  if group_sizes.shape != (qw.shape[0],):
    raise ValueError(f"group_sizes must be [{qw.shape[0]}] (one per expert), got {group_sizes.shape}")
  return _grouped(x, qw, group_sizes.astype(jnp.int32), jnp.dtype(compute_dtype), jnp.dtype(x.dtype))


def grouped_dot(a, w_ExKxN, group_sizes, compute_dtype):
  """a [M, K] sorted by group times each group's w [K, N]: compute_dtype operands, float32
  accumulation, rounded once. Differentiable in both operands (the experts' LoRA): the gradient
  to `a` is a grouped product too, the one to `w` a grouped contraction."""
  return _dot(a.astype(compute_dtype), w_ExKxN.astype(compute_dtype), group_sizes, jnp.dtype(compute_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dot(a, w, group_sizes, compute_dtype):
  return ragged_rows(a, w, group_sizes, False, compute_dtype)


def _dot_fwd(a, w, group_sizes, compute_dtype):
  return _dot(a, w, group_sizes, compute_dtype), (a, w, group_sizes)


def _dot_bwd(compute_dtype, residuals, g):
  a, w, group_sizes = residuals
  g = g.astype(compute_dtype)
  da = ragged_rows(g, w, group_sizes, True, a.dtype)  # g @ w[e]^T
  dw = ragged_contraction(a, g, group_sizes, w.dtype)  # a_e^T g_e
  return da, dw, None


_dot.defvjp(_dot_fwd, _dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(x, qw, group_sizes, compute_dtype, x_dtype):
  weights = dequantize(qw, compute_dtype)  # [E, N, K]
  return ragged_rows(x.astype(compute_dtype), weights, group_sizes, True, compute_dtype)


def _grouped_fwd(x, qw, group_sizes, compute_dtype, x_dtype):
  return _grouped(x, qw, group_sizes, compute_dtype, x_dtype), (qw, group_sizes)


def _grouped_bwd(compute_dtype, x_dtype, residuals, dy):
  qw, group_sizes = residuals
  dx = ragged_rows(dy.astype(compute_dtype), dequantize(qw, compute_dtype), group_sizes, False,
                   compute_dtype)  # dy @ W[e], W[e] [N, K]
  return dx.astype(x_dtype), None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
