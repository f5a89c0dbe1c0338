"""Fused 4-bit dequantize-matmul for decoding (M = 1..64) on Hopper GPUs through Mosaic GPU.

  decode    Y^T[N, m] = W [N, K] @ X^T      lhs = W tile [64 (n), 128 (k)], dequantized on chip
                                            (m = 1..64 rows padded to 64, K split across CTAs)
  gemv      M = 1..4 on the CUDA cores: the widened tile times x's slice, summed per row.

Both read bitsandbytes' stored codes as they are. Each CTA owns one output tile and pipelines
over the contraction with TMA: x's tile, the 4-bit code tile and its scales land in shared
memory; one warpgroup widens the codes in registers (a byte-permute table lookup, times the
scale), stores the bf16 tile into one half of a double-buffered swizzled shared-memory tile and
issues an asynchronous wgmma on it, which runs while the next step widens into the other half.
The dequantized weight exists only tile by tile on chip, never in device memory. The training
shapes' kernels are in gpu_matmul.py (the weight as wgmma's register operand, warp-specialized).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.layout import GROUP, HALF, decode_codes, pad_rows

DECODE_ROWS = 64  # decode: activations padded to wgmma's n = 64 (Mosaic GPU's layout inference
                  # finds no layout for n = 16 or 32 in JAX 0.10-0.11)
DECODE_TILE_N = 64  # decode: weight rows per CTA
GEMV_MAX_ROWS = 4  # gemv (no tensor cores): one float32 [tile, 64] accumulator per row of x
GEMV_TILE_N, GEMV_STAGES, GEMV_CTAS = 128, 4, 528  # the fastest of `bench/kernels.py --tune decode`
MIN_CTAS = 264  # decode: split K until about 2 CTAs per SM of an H100


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The decode kernel's weight rows per CTA and pipeline depth."""

  n: int = DECODE_TILE_N
  stages: int = 3
  overlap: bool = True  # double-buffer the widened W tile so wgmma runs under the next widening


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # not public in 0.10
  return InterpretGPUParams(uninitialized_memory="nan")  # unwritten outputs stay NaN


def _swizzled(cols: int, dtype) -> tuple:
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _byte_plane_words(table) -> tuple[list[int], list[int]]:
  """The bf16 codebook as two 16-byte tables (low bytes, high bytes), four 32-bit words each."""
  bits = np.asarray(table, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
  words = lambda plane: [int(sum(int(plane[4 * w + i]) << (8 * i) for i in range(4)))
                         for w in range(4)]
  return words(bits & 0xFF), words(bits >> 8)


def _lut_bf16(codes, table):
  """(high-nibble values, low-nibble values) as bf16 arrays in codes' WGMMA layout, by byte permutes.

  Each register of `codes` holds two bytes (two columns). Their four nibbles index two 16-byte
  tables (the low and the high bytes of the bf16 codebook) through `prmt`, 3 permutes per table
  for all four nibbles (as CUTLASS's int4 converters do), and two more permutes interleave the
  bytes into one bf16x2 register per nibble half: 11 instructions for 4 values, against ~30 per
  value for the select tree.
  """
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  low_words, high_words = _byte_plane_words(table)
  out_type = plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=(out_type, out_type))
  def widen(_, codes_fa):
    i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
    bf16x2 = ir.VectorType.get([2], ir.BF16Type.get())
    c = lambda v: arith.constant(i32, v)
    asm = f"""{{
      .reg .b32 p, n, lo, hi;
      prmt.b32 p, {low_words[0]}, {low_words[1]}, $2;
      prmt.b32 n, {low_words[2]}, {low_words[3]}, $2;
      prmt.b32 lo, p, n, $3;
      prmt.b32 p, {high_words[0]}, {high_words[1]}, $2;
      prmt.b32 n, {high_words[2]}, {high_words[3]}, $2;
      prmt.b32 hi, p, n, $3;
      prmt.b32 $0, lo, hi, 0x7351;
      prmt.b32 $1, lo, hi, 0x6240;
    }}"""
    struct = llvm.StructType.get_literal([i32, i32])
    high_regs = np.empty_like(codes_fa.registers)
    low_regs = np.empty_like(codes_fa.registers)
    for idx, reg in np.ndenumerate(codes_fa.registers):
      x = arith.extui(i32, mgpu_utils.bitcast(reg, i16))  # nibbles: lo(b0) hi(b0) lo(b1) hi(b1)
      index = arith.andi(x, c(0x7777))
      select = arith.ori(arith.shrui(arith.andi(x, c(0x8888)), c(1)), c(0x3210))
      out = llvm.inline_asm(struct, [index, select], asm, "=r,=r,r,r")
      high_regs[idx] = mgpu_utils.bitcast(llvm.extractvalue(i32, out, [0]), bf16x2)
      low_regs[idx] = mgpu_utils.bitcast(llvm.extractvalue(i32, out, [1]), bf16x2)
    make = lambda regs: mgpu.FragmentedArray(_registers=regs, _layout=codes_fa.layout,
                                             _is_signed=None)
    return make(high_regs), make(low_regs)

  return widen(codes)


def _widen(codes_smem, scales_smem, *, table, layout_hints: bool, dtype=jnp.bfloat16) -> list:
  """[high-nibble values, low-nibble values] of a bitsandbytes-packed code tile [R, 64], each
  table[code] * scale in the tile's shape (WGMMA layout on the GPU).

  A 64-byte row holds two whole quant blocks of one weight row (bytes [0, 32) the first), so the
  scale (scales_smem [2, R]) changes at column 32 for both nibbles.
  """
  hint = plgpu.layout_cast if layout_hints else (lambda x, _: x)
  codes_u8 = hint(codes_smem[...], plgpu.Layout.WGMMA)
  scale_dtype = jnp.bfloat16 if layout_hints else jnp.float32
  row_scales = [lax.broadcast_in_dim(
      hint(scales_smem[h], plgpu.Layout.WGMMA.reduce(1)).astype(scale_dtype),
      codes_u8.shape, [0]) for h in range(2)]
  iota = (plgpu.broadcasted_iota(jnp.int32, codes_u8.shape, 1, layout=plgpu.Layout.WGMMA)
          if layout_hints else lax.broadcasted_iota(jnp.int32, codes_u8.shape, 1))
  scale = jnp.where(iota < HALF // 2, row_scales[0], row_scales[1])
  if layout_hints:  # the GPU: byte-permute lookup, bf16 scale multiply (1 rounding more than XLA)
    return [v * scale for v in _lut_bf16(codes_u8, table)]
  codes = codes_u8.astype(jnp.int32)  # the interpreter runs no inline PTX: the select tree, exact
  return [(decode_codes(nibbles, table) * scale).astype(dtype)  # float32 products
          for nibbles in (codes >> 4, codes & 0xF)]


def _dequantize_tile(codes_smem, scales_smem, w_smem, **widen):
  """w_smem (bf16) <- table[codes] * scale, the two nibble halves side by side along columns."""
  values = _widen(codes_smem, scales_smem, dtype=w_smem.dtype, **widen)
  for half in range(2):
    w_smem[:, pl.ds(half * HALF, HALF)] = values[half]
  plgpu.commit_smem()


def _call(x_T, codes, scales_T, *, table, tiles: Tiles, interpret: bool, splits: int,
          out_cols: int):
  """The decode kernel: Y^T partials [splits * N, out_cols] f32 = W @ x_T per part of K.

  out_cols: the columns of each [64, 64] output tile written out (the real rows of x, rounded up
  to 8): a split-K partial sum is written and read back once more, so M = 1 must not pay for 64
  columns of it."""
  if interpret:  # JAX 0.10's Mosaic GPU interpreter can deadlock on delayed buffer release; it
    tiles = dataclasses.replace(tiles, overlap=False)  # runs wgmma synchronously anyway
  dtype = x_T.dtype
  (k, m), n = x_T.shape, codes.shape[0]
  k_part = k // splits
  steps = k_part // GROUP
  w_shape, acc_shape = (tiles.n, GROUP), (tiles.n, m)

  def kernel(a_gmem, codes_gmem, scales_gmem, out_gmem, w_smem, out_smem):
    i, j = lax.axis_index("i"), lax.axis_index("j")
    # The activation tile stays one step longer: wgmma of step s still reads it while step s + 1
    # widens its codes into the other half of the double-buffered w_smem.
    in_specs = [
        plgpu.BlockSpec((GROUP, m), lambda s: (s, 0), transforms=_swizzled(m, dtype),
                        delay_release=int(tiles.overlap)),
        plgpu.BlockSpec((tiles.n, HALF), lambda s: (0, s)),
        plgpu.BlockSpec((2, tiles.n), lambda s: (s, 0))]

    def with_acc(acc_ref):
      def step(idx, a_smem, codes_smem, scales_smem):
        w = w_smem.at[idx[0] % 2 if tiles.overlap else 0]
        _dequantize_tile(codes_smem, scales_smem, w, table=table, layout_hints=not interpret)
        plgpu.wgmma(acc_ref, w, a_smem)
        plgpu.wgmma_wait(int(tiles.overlap))  # overlap: the previous step's wgmma is done

      plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs,
                          max_concurrent_steps=tiles.stages)(
          a_gmem.at[pl.ds(j * k_part, k_part), :],
          codes_gmem.at[pl.ds(i * tiles.n, tiles.n), pl.ds(j * (k_part // 2), k_part // 2)],
          scales_gmem.at[pl.ds(j * (k_part // HALF), k_part // HALF), pl.ds(i * tiles.n, tiles.n)])
      plgpu.wgmma_wait(0)
      out_smem[...] = acc_ref[...][:, :out_cols]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(j * n + i * acc_shape[0], acc_shape[0]), :])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(with_acc, plgpu.ACC(acc_shape, jnp.float32))
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((splits * n, out_cols), jnp.float32),
      grid=(n // tiles.n, splits), grid_names=("i", "j"),
      scratch_types=[plgpu.SMEM((1 + tiles.overlap, *w_shape), dtype,
                                transforms=_swizzled(w_shape[1], dtype)),
                     plgpu.SMEM((acc_shape[0], out_cols), jnp.float32)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else None,
  )
  return call(x_T, codes, scales_T)


@functools.partial(jax.jit, static_argnames=("table", "tiles", "interpret", "min_ctas"))
def decode(x_MxK, codes, scales_T, *, table, tiles: Tiles = Tiles(),
           interpret: bool = False, min_ctas: int = MIN_CTAS):
  """Y [M, N] f32 = x @ W^T for M <= 64, reading the stored codes as they are.

  codes: uint8 [N, K/2] in bitsandbytes' packing (even element in the high nibble); scales_T
  [K/64, N]. The nibbles of a 64-byte tile widen into the even and the odd columns of its 128
  elements, so x's columns are permuted the same way (x is tiny) instead of the weight.
  """
  m, k = x_MxK.shape
  n = codes.shape[0]
  x_perm = x_MxK.reshape(m, k // GROUP, HALF, 2).swapaxes(2, 3).reshape(m, k)
  x_T = pad_rows(x_perm, DECODE_ROWS).T
  splits = decode_splits(n, k, tiles.n, min_ctas)
  cols = min(DECODE_ROWS, -(-m // 8) * 8)
  y_T = _call(x_T, codes, scales_T, table=table, tiles=tiles, interpret=interpret, splits=splits,
              out_cols=cols)
  return y_T.reshape(splits, n, cols).sum(0)[:, :m].T


def decode_splits(n: int, k: int, tile_n: int, min_ctas: int = MIN_CTAS) -> int:
  """How many parts to cut K into so that the grid has about min_ctas CTAs."""
  steps = k // GROUP
  want = max(1, -(-min_ctas // (n // tile_n)))
  return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= want)


@functools.partial(jax.jit, static_argnames=("table", "tile_n", "stages", "min_ctas", "interpret"))
def gemv(x_MxK, codes, scales_T, *, table, tile_n: int = GEMV_TILE_N, stages: int = GEMV_STAGES,
         min_ctas: int = GEMV_CTAS, interpret: bool = False):
  """Y [M, N] f32 = x @ W^T for M <= GEMV_MAX_ROWS, on the CUDA cores (no wgmma, no padding).

  Operands as decode()'s (stored bnb codes, x's columns permuted to the nibble order). Each step
  widens a [tile_n, 128] weight tile in registers and multiplies it by x's [128] slice broadcast
  over the rows, into a float32 accumulator of the tile's shape; the row sums leave at the end.
  x costs 256 bytes a step per row, where decode()'s wgmma reads a 64-row padded [128, 64] tile.
  """
  m, k = x_MxK.shape
  n = codes.shape[0]
  if m > GEMV_MAX_ROWS or n % tile_n:
    raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows and N divisible by {tile_n}; got "
                     f"{m} rows, N = {n}")
  x_perm = x_MxK.reshape(m, k // GROUP, HALF, 2).swapaxes(2, 3).reshape(m, k)
  splits = decode_splits(n, k, tile_n, min_ctas)
  k_part = k // splits
  hints = not interpret
  hint = plgpu.layout_cast if hints else (lambda v, _: v)

  def kernel(x_gmem, codes_gmem, scales_gmem, out_gmem, out_smem):
    i, j = lax.axis_index("i"), lax.axis_index("j")

    def step(_, x_smem, codes_smem, scales_smem, accs):
      halves = _widen(codes_smem, scales_smem, table=table, layout_hints=hints)
      out = []
      for r, acc in enumerate(accs):
        for h, values in enumerate(halves):
          part = (r, pl.ds(h * HALF, HALF))
          xv = (plgpu.load(x_smem, part, layout=plgpu.Layout.WGMMA.reduce(0)) if hints
                else x_smem[part])
          acc = acc + values.astype(jnp.float32) * lax.broadcast_in_dim(
              xv.astype(jnp.float32), values.shape, [1])
        out.append(acc)
      return tuple(out)

    zeros = tuple(hint(jnp.zeros((tile_n, HALF), jnp.float32), plgpu.Layout.WGMMA) for _ in range(m))
    accs = plgpu.emit_pipeline(
        step, grid=(k_part // GROUP,), max_concurrent_steps=stages, init_carry=zeros,
        in_specs=[plgpu.BlockSpec((m, GROUP), lambda s: (0, s)),
                  plgpu.BlockSpec((tile_n, HALF), lambda s: (0, s)),
                  plgpu.BlockSpec((2, tile_n), lambda s: (s, 0))],
    )(x_gmem.at[:, pl.ds(j * k_part, k_part)],
      codes_gmem.at[pl.ds(i * tile_n, tile_n), pl.ds(j * (k_part // 2), k_part // 2)],
      scales_gmem.at[pl.ds(j * (k_part // HALF), k_part // HALF), pl.ds(i * tile_n, tile_n)])
    for r, acc in enumerate(accs):
      out_smem.at[r][...] = acc.sum(axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[:, pl.ds(j * n + i * tile_n, tile_n)])
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, splits * n), jnp.float32),
      grid=(n // tile_n, splits), grid_names=("i", "j"),
      scratch_types=[plgpu.SMEM((m, tile_n), jnp.float32)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else None,
  )
  return call(x_perm, codes, scales_T).reshape(m, splits, n).sum(1)
