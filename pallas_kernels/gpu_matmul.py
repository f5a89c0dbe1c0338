"""Fused 4-bit dequantize-matmul for training shapes on Hopper: the weight as wgmma's register operand.

Both training products are computed transposed, so that the 4-bit weight is wgmma's A operand,
the one that may come from registers:

  forward   Y^T  [N, M] = W   [N, K] @ X^T  [K, M]      (codes: W packed along K)
  backward  dX^T [K, M] = W^T [K, N] @ dY^T [N, M]      (codes: W^T packed along N)

and the wrapper hands back the transpose (XLA fuses it into the consumer). A CTA owns a
[128 weight rows, 256 activation rows] output tile and runs three warpgroups: one issues the TMA
copies (activation tile [256, 64] bf16, code tile [128, 32] bytes, the step's 128 scales) up to
`stages` steps ahead; two compute warpgroups each widen their [64, 64] slice of the weight tile in
registers (byte-permute lookup of the codebook, times the block scale, in bf16) and issue
wgmma(acc [64, 256] f32 += W_tile @ activation_tile^T) on it straight from registers. No widened
weight is ever stored, not even to shared memory; while one warpgroup widens, the other's wgmma
runs. Each 256-row activation tile is shared by 128 weight rows and each widened weight by 256
activation rows (the single-warpgroup kernel it replaced: 128), which halves the widening work per
FLOP.

One pipeline step is one quantization block of 64 contraction elements: the codes are packed
*block-split* (layout.split_codes in blocks of 64: byte c of a block's 32 holds element c in the
high and element c + 32 in the low nibble), so a [64, 32] byte tile widens into the two 32-column
halves of the [64, 64] operand, one scale per weight row (forward) or per weight column (backward).

Interpreted (CPU tests) the kernels need XLA:CPU's plain scheduler (gpu.SERIAL_XLA_CPU), and since the
interpreter takes wgmma operands from shared memory only, that path stages the widened tile and
the transposed activations there.
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

from pallas_kernels.gpu import (interpret_params, interpret_staging, register_wgmma, sm_count,
                                 swizzled)
from pallas_kernels.layout import BLOCK, decode_codes, pad_rows

EPILOGUE = 64  # output columns per shared-memory store


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


@dataclasses.dataclass(frozen=True)
class Config:
  """Weight rows per compute warpgroup (wgmma M), activation rows per CTA (wgmma N), pipeline
  depth, compute warpgroups per CTA (plus one issuing the copies)."""

  rows: int = 64
  cols: int = 256
  stages: int = 4
  compute_wgs: int = 2
  persistent: bool = True  # one CTA per SM loops over output tiles: the next tile's copies
                           # start while this one's epilogue stores


def _concat_columns(parts):
  """One WGMMA-layout array from WGMMA-layout arrays of equal rows, side by side along columns."""
  from jax.experimental.mosaic import gpu as mgpu
  rows = parts[0].shape[0]
  shape = (rows, sum(p.shape[1] for p in parts))
  out_type = plgpu.ShapeDtypeStruct(shape, parts[0].dtype, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * len(parts), return_type=out_type)
  def concat(_, *arrays):
    registers = np.concatenate([a.registers for a in arrays], axis=1)  # axis 1: 8-column tiles
    assert registers.shape == arrays[0].layout.registers_shape(shape), registers.shape
    return mgpu.FragmentedArray(_registers=registers, _layout=arrays[0].layout, _is_signed=None)

  return concat(*parts)


def _weight_operand(codes_smem, scale_smem, *, table, per_row: bool, hints: bool):
  """bf16 [rows, 64] = table[code] * scale of one block-split code tile [rows, 32]."""
  hint = plgpu.layout_cast if hints else (lambda v, _: v)
  codes = hint(codes_smem[...], plgpu.Layout.WGMMA)
  axis = 0 if per_row else 1  # the scale vector runs along rows (forward) or columns (backward)
  scale = hint(scale_smem[...], plgpu.Layout.WGMMA.reduce(1 - axis))
  if hints:  # the GPU: byte-permute lookup, bf16 scale multiply
    values = _concat_columns(_lut_bf16(codes, table))
    return values * lax.broadcast_in_dim(scale.astype(jnp.bfloat16), values.shape, [axis])
  codes = codes.astype(jnp.int32)  # the interpreter runs no inline PTX: the select tree, exact
  values = jnp.concatenate([decode_codes(codes >> 4, table), decode_codes(codes & 0xF, table)], 1)
  return (values * lax.broadcast_in_dim(scale, values.shape, [axis])).astype(jnp.bfloat16)


def _call(a, codes, scales, *, per_row: bool, table, config: Config, interpret: bool):
  """out [R, M] bf16 = widened codes [R, C] @ a [M, C]^T; see the module docstring.

  per_row (forward): scales [C/64, R], the block scale of weight row r at [c // 64, r];
  else (backward): scales [R/64, C], the block scale of weight row r, column c at [r // 64, c].
  """
  (m, c), r = a.shape, codes.shape[0]
  cta_rows = config.compute_wgs * config.rows
  if per_row:
    scale_block, scale_index = (1, cta_rows), lambda s: (s, 0)
  else:  # one scale row per compute warpgroup: its 64 weight rows are one block
    assert config.rows == BLOCK
    scale_block, scale_index = (config.compute_wgs, BLOCK), lambda s: (0, s)
  in_specs = [  # one quantization block a step: the activation tile, the codes, the scales
      plgpu.BlockSpec((config.cols, BLOCK), lambda s: (0, s), transforms=swizzled(BLOCK, a.dtype)),
      plgpu.BlockSpec((cta_rows, BLOCK // 2), lambda s: (0, s)),
      plgpu.BlockSpec(scale_block, scale_index)]

  def pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(c // BLOCK,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=config.compute_wgs, max_concurrent_steps=config.stages,
        compute_context=compute_context)

  r_tiles, m_tiles = r // cta_rows, m // config.cols

  def operands(a_gmem, codes_gmem, scales_gmem, i, j):
    return (a_gmem.at[pl.ds(j * config.cols, config.cols), :],
            codes_gmem.at[pl.ds(i * cta_rows, cta_rows), :],
            scales_gmem.at[:, pl.ds(i * cta_rows, cta_rows)] if per_row
            else scales_gmem.at[pl.ds(i * config.compute_wgs, config.compute_wgs), :])

  def kernel(a_gmem, codes_gmem, scales_gmem, out_gmem, out_smem, *staging):
    ignore = lambda *_, **__: None
    first = operands(a_gmem, codes_gmem, scales_gmem, 0, 0)

    @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(*first),
                       collective_axes="wg")
    def _(allocations):
      wg = lax.axis_index("wg")
      my_rows = pl.ds(wg * config.rows, config.rows)

      def tile(i, j):
        def compute_context(run_pipeline):
          @functools.partial(pl.run_scoped,
                             acc_ref=plgpu.ACC((config.rows, config.cols), jnp.float32))
          def _(acc_ref):
            run_pipeline(acc_ref)
            out = acc_ref[...].astype(out_gmem.dtype)
            for e in range(config.cols // EPILOGUE):
              slot = e % 2
              plgpu.wait_smem_to_gmem(1, wait_read_only=True)
              out_smem[wg, slot] = out[:, e * EPILOGUE:(e + 1) * EPILOGUE]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, slot],
                  out_gmem.at[pl.ds(i * cta_rows + wg * config.rows, config.rows),
                              pl.ds(j * config.cols + e * EPILOGUE, EPILOGUE)])

        def step(_, a_smem, codes_smem, scales_smem, acc_ref):
          scale = scales_smem.at[0, my_rows] if per_row else scales_smem.at[wg]
          w = _weight_operand(codes_smem.at[my_rows], scale, table=table, per_row=per_row,
                              hints=not interpret)
          register_wgmma(acc_ref, w, a_smem, wg=wg, staging=staging, interpret=interpret)
          plgpu.wgmma_wait(0)  # the register operand must stay intact until the wgmma is done
          return acc_ref

        pipeline(step, compute_context)(*operands(a_gmem, codes_gmem, scales_gmem, i, j),
                                        allocations=allocations)

      if config.persistent:
        @plgpu.nd_loop((m_tiles, r_tiles), collective_axes="sm")
        def _(loop):
          j, i = loop.index
          tile(i, j)
      else:
        tile(lax.axis_index("i"), lax.axis_index("j"))
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((r, m), a.dtype),
      **(dict(grid=(min(sm_count(interpret), r_tiles * m_tiles),), grid_names=("sm",))
         if config.persistent else dict(grid=(r_tiles, m_tiles), grid_names=("i", "j"))),
      num_threads=config.compute_wgs + 1, thread_name="wg",
      scratch_types=[plgpu.SMEM((config.compute_wgs, 2, config.rows, EPILOGUE), a.dtype,
                                transforms=swizzled(EPILOGUE, a.dtype)),
                     *interpret_staging(config.compute_wgs, config.rows, BLOCK, config.cols,
                                        interpret)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret),
  )
  return call(a, codes, scales)


def supported(n: int, k: int) -> bool:
  """Both products tile: weight rows by 128 (N forward, K backward), contraction by 64."""
  return n % (2 * BLOCK) == 0 and k % (2 * BLOCK) == 0


def _transposed_product(a, codes, scales, per_row, table, config, interpret):
  m = a.shape[0]
  out = _call(pad_rows(a.astype(jnp.bfloat16), config.cols), codes, scales, per_row=per_row,
              table=table, config=config, interpret=interpret)
  return out[:, :m].T


@functools.partial(jax.jit, static_argnames=("table", "config", "interpret"))
def forward(x_MxK, codes, scales_T, *, table, config: Config = Config(), interpret: bool = False):
  """Y [M, N] bf16 = x @ W^T; codes [N, K/2] block-split along K, scales_T [K/64, N]."""
  return _transposed_product(x_MxK, codes, scales_T, True, table, config, interpret)


@functools.partial(jax.jit, static_argnames=("table", "config", "interpret"))
def backward(dy_MxN, codes_T, scales_T, *, table, config: Config = Config(),
             interpret: bool = False):
  """dX [M, K] bf16 = dy @ W; codes_T [K, N/2] (W^T) block-split along N, scales_T [K/64, N]."""
  return _transposed_product(dy_MxN, codes_T, scales_T, False, table, config, interpret)
