"""Grouped (ragged) matmuls, rows sorted by group: on a Hopper GPU JAX's own Mosaic GPU kernels,
elsewhere `jax.lax.ragged_dot`.

XLA:GPU lowers `jax.lax.ragged_dot` to cuDNN only where its cuDNN supports the graph; otherwise
it rewrites it as a dense product over every group (measured on an H100 with JAX 0.11.2: one
Qwen3-30B-A3B experts layer at 4 x 2048 tokens asked for a [65,536 copies, 128 experts x 1,536]
temporary, 24 GiB). JAX ships grouped-GEMM kernels for Hopper in
`jax.experimental.pallas.ops.gpu` (`ragged_dot_mgpu`: rows ragged; `transposed_ragged_dot_mgpu`:
the contraction ragged, for weight gradients): each row tile is multiplied by its own group's
matrix only. They take bf16 / f16 operands, so float32 products (the CPU tests) keep
`ragged_dot`, whose result is the same mathematics.

Rows past the groups' total are not written by the kernel: they are set to zero here, as
`ragged_dot` gives them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gpu import is_hopper
from pallas_kernels.xla import precision_for

_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
# Tiles of JAX's example tuning for these kernels on an H100 (rows, columns, contraction).
BLOCK_M, BLOCK_N, BLOCK_K, STEPS, GRID_BLOCK_N = 128, 128, 64, 4, 1


def _on_gpu_kernels(*operands) -> bool:
  """Whether JAX's Mosaic GPU ragged kernels take these operands: a Hopper GPU (they issue wgmma;
  elsewhere XLA's ragged_dot) and one 16-bit dtype."""
  return (jax.default_backend() == "gpu" and is_hopper()
          and all(o.dtype in _KERNEL_DTYPES for o in operands) and len({o.dtype for o in operands}) == 1)


def _block(dim: int, largest: int) -> int | None:
  """The largest of largest, largest / 2, ... (at least 64) that divides dim; None if none."""
  b = largest
  while b >= 64 and dim % b:
    b //= 2
  return b if b >= 64 else None


def _rows_in_groups(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x [M, ...] with its rows past the groups' total set to 0."""
  return jnp.where(jnp.arange(x.shape[0])[:, None] < jnp.sum(group_sizes), x, jnp.zeros((), x.dtype))


def ragged_rows(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool,
                out_dtype) -> jax.Array:
  """out [M, N] = lhs [M, K] rows of group g times rhs[g]: rhs [G, K, N], or [G, N, K] with
  transpose_rhs. float32 accumulation, rounded once to out_dtype; rows past the total are 0."""
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  k = lhs.shape[1]
  block_n, block_k = _block(n, BLOCK_N), _block(k, BLOCK_K)
  if _on_gpu_kernels(lhs, rhs) and block_n and block_k:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    out = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, block_m=BLOCK_M, block_n=block_n,
                                     block_k=block_k, max_concurrent_steps=STEPS, grid_block_n=GRID_BLOCK_N,
                                     transpose_rhs=transpose_rhs)
    return _rows_in_groups(out, group_sizes).astype(out_dtype)
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision_for(lhs.dtype),
                           preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def ragged_contraction(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype) -> jax.Array:
  """out [G, K, N] = for each group g, lhs[rows of g]^T @ rhs[rows of g] (lhs [M, K], rhs [M, N]):
  a weight gradient per group. Rows past the total contribute nothing."""
  k, n = lhs.shape[1], rhs.shape[1]
  block_m, block_n = _block(k, BLOCK_M), _block(n, BLOCK_N)
  if _on_gpu_kernels(lhs, rhs) and block_m and block_n:
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        _rows_in_groups(lhs, group_sizes), rhs, group_sizes=group_sizes, block_m=block_m, block_n=block_n, block_k=BLOCK_K,
        max_concurrent_steps=STEPS, grid_block_n=GRID_BLOCK_N)
    return out.astype(out_dtype)
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision_for(lhs.dtype),
                                   preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
