"""Fused 4-bit dequantize-matmul on TPU through Mosaic TPU (pltpu).

Both products read the transposed split codes [K/2, N] (layout.py) and the [K/64, N] scales:

  forward   Y  [M, N] = X  [M, K] @ W^T      grid (M/tm, N/tn, K/tk), K innermost
  backward  dX [M, K] = dY [M, N] @ W        grid (M/tm, K/tk, N/tn), N innermost

A grid step copies a [tk/2, tn] code block and its [tk/64, tn] scales into VMEM, widens them into
the bf16 tile W^T [tk, tn] there (15-select tree per code, times the scale: the two nibble halves of
each 64-row byte slab are the two 64-row halves of a 128-row group), and feeds it to the MXU with a
float32 accumulator in VMEM. Tiles are multiples of 128 (the v5e MXU); the defaults (256 x 256 x
512) keep every double-buffered block plus the accumulator under 2 MiB of VMEM, well inside v5e's
16 MiB and v4/v5p's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.layout import GROUP, HALF, decode_codes, pad_rows

TILE_M, TILE_N, TILE_K = 256, 256, 512


def pick(dim: int, preferred: int, smallest: int = GROUP) -> int | None:
  """The largest of preferred, preferred/2, ... (down to smallest) dividing dim."""
  t = preferred
  while t >= smallest:
    if dim % t == 0:
      return t
    t //= 2
  return None


def _widen(codes_ref, scales_ref, table, dtype):
  """W^T tile [tk, tn] in `dtype` from codes [tk/2, tn] (split packing) and scales [tk/64, tn]."""
  codes = codes_ref[...].astype(jnp.int32)
  rows, tn = codes.shape
  groups = rows // HALF
  halves = jnp.stack([(codes >> 4).reshape(groups, HALF, tn), (codes & 0xF).reshape(groups, HALF, tn)],
                     axis=1)  # [groups, 2, 64, tn]: row order of W^T within each 128-row group
  values = decode_codes(halves.reshape(groups * 2, HALF, tn), table)
  values = values * scales_ref[...][:, None, :]
  return values.reshape(groups * GROUP, tn).astype(dtype)


def _forward_kernel(x_ref, codes_ref, scales_ref, y_ref, acc_ref, *, table):
  @pl.when(pl.program_id(2) == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  w_T = _widen(codes_ref, scales_ref, table, x_ref.dtype)
  acc_ref[...] += jnp.dot(x_ref[...], w_T, preferred_element_type=jnp.float32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    y_ref[...] = acc_ref[...]


def _backward_kernel(dy_ref, codes_ref, scales_ref, dx_ref, acc_ref, *, table):
  @pl.when(pl.program_id(2) == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  w_T = _widen(codes_ref, scales_ref, table, dy_ref.dtype)  # [tk, tn]
  acc_ref[...] += jax.lax.dot_general(dy_ref[...], w_T, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    dx_ref[...] = acc_ref[...]


def _interpret(interpret: bool | str):
  """False: Mosaic TPU. True: Pallas' TPU interpreter (host callbacks, uninitialized memory
  NaN). "hlo": the kernel discharged into plain XLA ops, without callbacks, so it also runs
  under remat and on several simulated devices at once (tests/test_kernels_mesh.py)."""
  if interpret == "hlo":
    return True
  return pltpu.InterpretParams(uninitialized_memory="nan") if interpret else False


def supported(n: int, k: int) -> bool:
  """N a multiple of 128; K of 512, so a scale block has the 8 sublanes of an f32 tile."""
  return pick(n, TILE_N) is not None and k % TILE_K == 0


def _call(product: str, a, codes_T, scales_T, *, table, out_cols: int, steps: int, tn: int,
          tk: int, interpret: bool | str):
  """The pallas_call shared by both products: grid (M/tm, out_cols/tile, steps), steps innermost.

  forward: a = x, output tile (tm, tn), step s walks K; backward: a = dy, output tile (tm, tk),
  step s walks N. The code block of a grid point is at (k block, n block) either way.
  """
  forward_ = product == "forward"
  kernel = functools.partial(_forward_kernel if forward_ else _backward_kernel, table=table)
  m = a.shape[0]
  tm = min(TILE_M, -(-m // 32) * 32)
  a = pad_rows(a, tm)
  kn = (lambda i, j, s: (s, j)) if forward_ else (lambda i, j, s: (j, s))
  out_tile = tn if forward_ else tk
  out = pl.pallas_call(
      kernel,
      grid=(a.shape[0] // tm, out_cols // out_tile, steps),
      in_specs=[pl.BlockSpec((tm, tk if forward_ else tn), lambda i, j, s: (i, s)),
                pl.BlockSpec((tk // 2, tn), kn),
                pl.BlockSpec((tk // HALF, tn), kn)],
      out_specs=pl.BlockSpec((tm, out_tile), lambda i, j, s: (i, j)),
      out_shape=jax.ShapeDtypeStruct((a.shape[0], out_cols), jnp.float32),
      scratch_shapes=[pltpu.VMEM((tm, out_tile), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
  )(a, codes_T, scales_T)
  return out[:m]


@functools.partial(jax.jit, static_argnames=("table", "interpret"))
def forward(x_MxK, codes_T, scales_T, *, table, interpret: bool | str = False):
  """Y [M, N] f32 = x @ W^T; codes_T [K/2, N] split packing, scales_T [K/64, N]."""
  k, n = x_MxK.shape[1], codes_T.shape[1]
  return _call("forward", x_MxK, codes_T, scales_T, table=table, out_cols=n, steps=k // TILE_K,
               tn=pick(n, TILE_N), tk=TILE_K, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("table", "interpret"))
def backward(dy_MxN, codes_T, scales_T, *, table, interpret: bool | str = False):
  """dX [M, K] f32 = dy @ W; codes_T [K/2, N] split packing, scales_T [K/64, N]."""
  n, k = dy_MxN.shape[1], codes_T.shape[0] * 2
  tn = pick(n, TILE_N)
  return _call("backward", dy_MxN, codes_T, scales_T, table=table, out_cols=k, steps=n // tn,
               tn=tn, tk=TILE_K, interpret=interpret)
