"""Fused 4-bit dequantize-matmul on Hopper GPUs through Mosaic GPU (wgmma, TMA pipelines).

One kernel body serves the three products, all as out = lhs @ rhs with float32 accumulation:

  forward   Y  [M, N] = X  [M, K] @ W^T     rhs = W^T tile [128 (k), 128 (n)], dequantized on chip
  backward  dX [M, K] = dY [M, N] @ W       rhs = W   tile [128 (n), 128 (k)], dequantized on chip
  decode    Y^T[N, m] = W [N, K] @ X^T      lhs = W   tile [64 (n), 128 (k)], dequantized on chip
                                            (m = 1..16 rows padded to 16: wgmma's n may be 16)

Each CTA owns one output tile and pipelines over the contraction with TMA: the activation tile,
the split 4-bit code tile (see layout.py) and its scales land in shared memory; one warpgroup
widens the codes in registers (15-select tree on the code bits, times the scale), stores the bf16
tile into swizzled shared memory and issues wgmma on it. The dequantized weight exists only tile by
tile in shared memory, never in device memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.layout import GROUP, HALF, decode_codes

DECODE_ROWS = 64  # decode: activations padded to wgmma's n = 64 (Mosaic GPU's layout inference
                  # finds no layout for n = 16 or 32 in JAX 0.10-0.11)
DECODE_TILE_N = 64  # decode: weight rows per CTA
MIN_CTAS = 264  # decode: split K until about 2 CTAs per SM of an H100


@dataclasses.dataclass(frozen=True)
class Tiles:
  """CTA tile of the output and pipeline depth."""

  m: int = 128
  n: int = 128
  stages: int = 2


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # not public in 0.10
  return InterpretGPUParams(uninitialized_memory="nan")  # unwritten outputs stay NaN


def _swizzled(cols: int, dtype) -> tuple:
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _dequantize_tile(codes_smem, scales_smem, w_smem, *, table, scale_axis: int, bnb_order: bool,
                     layout_hints: bool):
  """w_smem (bf16) <- table[codes] * scale, the two nibble halves side by side along 1 - scale_axis.

  scale_axis=1: codes [64, C] (halves stacked along rows, one scale per column: forward);
  scale_axis=0: codes [R, 64] (halves side by side along columns, one scale per row).
  bnb_order: the codes are bitsandbytes' packing (decode): a 64-byte row holds two whole quant
  blocks, bytes [0, 32) the first, so the scale changes at column 32 for both nibbles.
  """
  hint = plgpu.layout_cast if layout_hints else (lambda x, _: x)
  codes = hint(codes_smem[...], plgpu.Layout.WGMMA).astype(jnp.int32)
  row_scales = [lax.broadcast_in_dim(hint(scales_smem[h], plgpu.Layout.WGMMA.reduce(1 - scale_axis)),
                                     codes.shape, [scale_axis]) for h in range(2)]
  if bnb_order:
    iota = (plgpu.broadcasted_iota(jnp.int32, codes.shape, 1, layout=plgpu.Layout.WGMMA)
            if layout_hints else lax.broadcasted_iota(jnp.int32, codes.shape, 1))
    first_block = iota < HALF // 2
    row_scales = [jnp.where(first_block, row_scales[0], row_scales[1])] * 2
  for half, nibbles in enumerate((codes >> 4, codes & 0xF)):
    values = (decode_codes(nibbles, table) * row_scales[half]).astype(w_smem.dtype)
    part = pl.ds(half * HALF, HALF)
    if scale_axis == 1:
      w_smem[part, :] = values
    else:
      w_smem[:, part] = values
  plgpu.commit_smem()


def _call(a, codes, scales_T, *, mode: str, table, tiles: Tiles, interpret: bool, splits: int = 1):
  """The pallas call for one of 'forward', 'backward', 'decode' (see module docstring)."""
  dtype = a.dtype
  if mode == "forward":
    (m, k), n = a.shape, codes.shape[1]
    out_shape, steps = (m, n), k // GROUP
    w_shape, lhs_shape, acc_shape = (GROUP, tiles.n), (tiles.m, GROUP), (tiles.m, tiles.n)
    grid = (m // tiles.m, n // tiles.n)
    scale_axis = 1
  elif mode == "backward":
    (m, n), k = a.shape, codes.shape[1] * 2
    out_shape, steps = (m, k), n // tiles.n
    w_shape, lhs_shape, acc_shape = (tiles.n, GROUP), (tiles.m, tiles.n), (tiles.m, GROUP)
    grid = (m // tiles.m, k // GROUP)
    scale_axis = 0
  else:  # decode: a is X^T [K, DECODE_ROWS]; K is cut into `splits` parts, summed by the caller
    (k, m), n = a.shape, codes.shape[0]
    k_part = k // splits
    out_shape, steps = (splits * n, m), k_part // GROUP
    w_shape, lhs_shape, acc_shape = (tiles.n, GROUP), (GROUP, m), (tiles.n, m)
    grid = (n // tiles.n, splits)
    scale_axis = 0

  def kernel(a_gmem, codes_gmem, scales_gmem, out_gmem, w_smem, out_smem):
    i, j = lax.axis_index("i"), lax.axis_index("j")
    if mode == "forward":
      a_ref = a_gmem.at[pl.ds(i * tiles.m, tiles.m), :]
      codes_ref = codes_gmem.at[:, pl.ds(j * tiles.n, tiles.n)]
      scales_ref = scales_gmem.at[:, pl.ds(j * tiles.n, tiles.n)]
      specs = [((tiles.m, GROUP), lambda s: (0, s)), ((HALF, tiles.n), lambda s: (s, 0)),
               ((2, tiles.n), lambda s: (s, 0))]
    elif mode == "backward":
      a_ref = a_gmem.at[pl.ds(i * tiles.m, tiles.m), :]
      codes_ref = codes_gmem.at[:, pl.ds(j * HALF, HALF)]
      scales_ref = scales_gmem.at[pl.ds(j * 2, 2), :]
      specs = [((tiles.m, tiles.n), lambda s: (0, s)), ((tiles.n, HALF), lambda s: (s, 0)),
               ((2, tiles.n), lambda s: (0, s))]
    else:
      a_ref = a_gmem.at[pl.ds(j * k_part, k_part), :]
      codes_ref = codes_gmem.at[pl.ds(i * tiles.n, tiles.n), pl.ds(j * (k_part // 2), k_part // 2)]
      scales_ref = scales_gmem.at[pl.ds(j * (k_part // HALF), k_part // HALF),
                                  pl.ds(i * tiles.n, tiles.n)]
      specs = [((GROUP, m), lambda s: (s, 0)), ((tiles.n, HALF), lambda s: (0, s)),
               ((2, tiles.n), lambda s: (s, 0))]
    a_spec, codes_spec, scales_spec = specs
    in_specs = [
        plgpu.BlockSpec(a_spec[0], a_spec[1], transforms=_swizzled(a_spec[0][1], dtype)),
        plgpu.BlockSpec(*codes_spec), plgpu.BlockSpec(*scales_spec)]

    def with_acc(acc_ref):
      def step(_, a_smem, codes_smem, scales_smem):
        _dequantize_tile(codes_smem, scales_smem, w_smem, table=table, scale_axis=scale_axis,
                         bnb_order=mode == "decode", layout_hints=not interpret)
        if mode == "decode":
          plgpu.wgmma(acc_ref, w_smem, a_smem)
        else:
          plgpu.wgmma(acc_ref, a_smem, w_smem)
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs,
                          max_concurrent_steps=tiles.stages)(a_ref, codes_ref, scales_ref)
      out_smem[...] = acc_ref[...]

    pl.run_scoped(with_acc, plgpu.ACC(acc_shape, jnp.float32))
    plgpu.commit_smem()
    rows, cols = acc_shape
    if mode == "decode":  # output tile (i, split j) of [splits * N, m]
      dst = out_gmem.at[pl.ds(j * n + i * rows, rows), :]
    else:
      dst = out_gmem.at[pl.ds(i * rows, rows), pl.ds(j * cols, cols)]
    plgpu.copy_smem_to_gmem(out_smem, dst)
    plgpu.wait_smem_to_gmem(0)

  del lhs_shape
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32),
      grid=grid, grid_names=("i", "j"),
      scratch_types=[plgpu.SMEM(w_shape, dtype, transforms=_swizzled(w_shape[1], dtype)),
                     plgpu.SMEM(acc_shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else None,
  )
  return call(a, codes, scales_T)


def _pad_rows(x, multiple: int):
  pad = -x.shape[0] % multiple
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


@functools.partial(jax.jit, static_argnames=("table", "tiles", "interpret"))
def forward(x_MxK, codes_T, scales_T, *, table, tiles: Tiles = Tiles(), interpret: bool = False):
  """Y [M, N] f32 = x @ W^T; codes_T [K/2, N] split packing, scales_T [K/64, N]."""
  m = x_MxK.shape[0]
  y = _call(_pad_rows(x_MxK, tiles.m), codes_T, scales_T, mode="forward", table=table,
            tiles=tiles, interpret=interpret)
  return y[:m]


@functools.partial(jax.jit, static_argnames=("table", "tiles", "interpret"))
def backward(dy_MxN, codes, scales_T, *, table, tiles: Tiles = Tiles(), interpret: bool = False):
  """dX [M, K] f32 = dy @ W; codes [N, K/2] split packing, scales_T [K/64, N]."""
  m = dy_MxN.shape[0]
  dx = _call(_pad_rows(dy_MxN, tiles.m), codes, scales_T, mode="backward", table=table,
             tiles=tiles, interpret=interpret)
  return dx[:m]


@functools.partial(jax.jit, static_argnames=("table", "tiles", "interpret"))
def decode(x_MxK, codes, scales_T, *, table, tiles: Tiles = Tiles(n=DECODE_TILE_N, stages=3),
           interpret: bool = False):
  """Y [M, N] f32 = x @ W^T for M <= 64, reading the stored codes as they are.

  codes: uint8 [N, K/2] in bitsandbytes' packing (even element in the high nibble); scales_T
  [K/64, N]. The nibbles of a 64-byte tile widen into the even and the odd columns of its 128
  elements, so x's columns are permuted the same way (x is tiny) instead of the weight.
  """
  m, k = x_MxK.shape
  n = codes.shape[0]
  x_perm = x_MxK.reshape(m, k // GROUP, HALF, 2).swapaxes(2, 3).reshape(m, k)
  x_T = _pad_rows(x_perm, DECODE_ROWS).T
  splits = decode_splits(n, k, tiles.n)
  y_T = _call(x_T, codes, scales_T, mode="decode", table=table, tiles=tiles, interpret=interpret,
              splits=splits)
  return y_T.reshape(splits, n, DECODE_ROWS).sum(0)[:, :m].T


def decode_splits(n: int, k: int, tile_n: int) -> int:
  """How many parts to cut K into so that the grid has about MIN_CTAS CTAs."""
  steps = k // GROUP
  want = max(1, -(-MIN_CTAS // (n // tile_n)))
  return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= want)
