"""Fused 4-bit dequantize-matmul for decoding (M = 1..64 rows) on Hopper: a shared-memory codebook.

  Y^T [N, m] = W [N, K] @ x_perm^T [K, m]    (m padded to `cols`: 16, 32 or 64; K split in parts)

Decoding is memory-bound: the kernel must stream the 4-bit codes at the copy rate, so what it can
afford per weight is little arithmetic. Here each code *byte* (two weights) is widened by one
shared-memory load from a 256-entry table of bf16 pairs (table[b >> 4], table[b & 15]),
replicated 32 times so that every lane of a warp reads its own bank (no conflicts whatever the
codes): about one integer instruction and half a load per weight, where gpu_matmul's byte-permute
lookup takes over three integer instructions. The widened [64, 64] tile times the row's block
scale (bf16) is wgmma's register operand (no shared-memory store), x's [cols, 64] slice the
shared-memory one, acc [64, cols] f32.

The kernel reads the stored bitsandbytes codes as they are: a [64, 32]-byte tile is one
quantization block of 64 weights per row, and a thread's register holding bytes (2t, 2t+1) of an
8-byte column group widens into its registers of columns (2t, 2t+1) of two 8-column groups, so
the widened tile's columns are the block's elements in the order of `column_order`; x's columns
are permuted the same way (x is tiny), not the weight.

Warp-specialized: one warpgroup issues the TMA copies (x's tile, a [128, 32 * blocks]-byte code
tile, the scales) `stages` steps ahead, `compute_wgs` warpgroups each own 64 weight rows; a step
widens all its blocks, then issues their wgmmas. Persistent: one CTA per SM loads the table
once and loops over (part of K, row tile) work items, the wrapper sums the parts. Measured in
docs/BENCHMARKS.md: compute-bound at ~60% of the copy rate (kernel alone, large shapes).
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

LANES = 32  # table copies, one per shared-memory bank
ROWS = 64  # weight rows per compute warpgroup (wgmma M)
MAX_ROWS = 64  # rows of x (wgmma N); more rows are training shapes (gpu_matmul)


def column_order(a: jax.Array) -> jax.Array:
  """a with its last axis permuted as the widened tile's columns hold a block's elements.

  Per 16 columns (one register of codes, 8 bytes wide, per thread quad): column
  16 g + 8 h + 2 t + e holds element 16 g + 4 t + 2 h + e (byte 8 g + 2 t + h, nibble e)."""
  *lead, k = a.shape
  return a.reshape(*lead, k // 16, 4, 2, 2).swapaxes(-3, -2).reshape(*lead, k)


@dataclasses.dataclass(frozen=True)
class Config:
  """Activation rows per CTA (wgmma N: x is padded to it), compute warpgroups per CTA, pipeline
  depth, and the CTAs to aim for when splitting K."""

  cols: int = 16
  compute_wgs: int = 2
  stages: int = 4
  blocks: int = 4  # quantization blocks a step: a code row of 32 * blocks bytes per TMA row
  item_cost: float = 2.0  # fixed cost of a work item (pipeline restart, epilogue), in steps


def pair_table(table) -> np.ndarray:
  """int32 [256, LANES]: entry b = bf16 pair (table[b >> 4], table[b & 15]), once per lane."""
  bits = np.asarray(table, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
  b = np.arange(256)
  pairs = (bits[b >> 4] | (bits[b & 15] << 16)).view(np.int32)
  return np.repeat(pairs[:, None], LANES, axis=1)


def _widen_pairs(codes, lut_smem):
  """bf16 [R, 2C] (WGMMA layout) from uint8 codes [R, C]: one table load per code byte."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  rows, cols = codes.shape
  out_type = plgpu.ShapeDtypeStruct((rows, 2 * cols), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=out_type)
  def widen(_, codes_fa, lut):
    i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
    bf16x2 = ir.VectorType.get([2], ir.BF16Type.get())
    base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(lut))
    lane_base = llvm.inline_asm(i32, [base], "{ .reg .b32 l; mov.u32 l, %laneid; "
                                "mad.lo.u32 $0, l, 4, $1; }", "=r,r")
    struct = llvm.StructType.get_literal([i32, i32])
    asm = f"""{{
      .reg .b32 a, b;
      and.b32 a, $2, 255;
      shr.u32 b, $2, 8;
      mad.lo.u32 a, a, {4 * LANES}, $3;
      mad.lo.u32 b, b, {4 * LANES}, $3;
      ld.shared.b32 $0, [a];
      ld.shared.b32 $1, [b];
    }}"""
    regs = codes_fa.registers  # axis 1: 8-column groups
    out_shape = list(regs.shape)
    out_shape[1] *= 2
    out = np.empty(out_shape, dtype=object)
    for idx, reg in np.ndenumerate(regs):
      x = arith.extui(i32, mgpu_utils.bitcast(reg, i16))
      pair = llvm.inline_asm(struct, [x, lane_base], asm, "=r,=r,r,r")
      for h in range(2):
        out_idx = (idx[0], 2 * idx[1] + h, *idx[2:])
        out[out_idx] = mgpu_utils.bitcast(llvm.extractvalue(i32, pair, [h]), bf16x2)
    assert out.shape == codes_fa.layout.registers_shape((rows, 2 * cols)), out.shape
    return mgpu.FragmentedArray(_registers=out, _layout=codes_fa.layout, _is_signed=None)

  return widen(codes, lut_smem)


def _weight_operand(codes_smem, scale_smem, lut_smem, *, table, hints: bool):
  """bf16 [64, 64] = table[code] * scale of one stored code tile [64, 32], columns in
  `column_order`."""
  if hints:
    values = _widen_pairs(plgpu.layout_cast(codes_smem[...], plgpu.Layout.WGMMA), lut_smem)
    scale = plgpu.layout_cast(scale_smem[...], plgpu.Layout.WGMMA.reduce(1))
    return values * lax.broadcast_in_dim(scale, values.shape, [0])
  codes = codes_smem[...].astype(jnp.int32)  # the interpreter runs no inline PTX: select tree
  natural = jnp.stack([decode_codes(codes >> 4, table), decode_codes(codes & 0xF, table)], -1)
  natural = natural.reshape(codes.shape[0], BLOCK).astype(jnp.bfloat16).astype(jnp.float32)
  values = column_order(natural) * scale_smem[...].astype(jnp.float32)[:, None]
  return values.astype(jnp.bfloat16)


def _call(x, codes, scales, lut, *, table, config: Config, splits: int, out_cols: int,
          interpret: bool):
  """Partials [splits * N, out_cols] f32: part j = W[:, part j of K] @ x[:, part j of K]^T.

  Persistent: one CTA per SM loads the table once, then loops over (part of K, row tile) work
  items; the copy warpgroup runs on into the next item while the compute warpgroups finish one.
  """
  (cols, k), n = x.shape, codes.shape[0]
  cta_rows = config.compute_wgs * ROWS
  k_part, step_k = k // splits, BLOCK * config.blocks
  r_tiles = n // cta_rows
  in_specs = [  # `blocks` quantization blocks a step: x's tile, the code tile, the block scales
      plgpu.BlockSpec((cols, step_k), lambda s: (0, s), transforms=swizzled(BLOCK, x.dtype)),
      plgpu.BlockSpec((cta_rows, step_k // 2), lambda s: (0, s)),
      plgpu.BlockSpec((config.blocks, cta_rows), lambda s: (s, 0))]

  def pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_part // step_k,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=config.compute_wgs, max_concurrent_steps=config.stages,
        compute_context=compute_context)

  def operands(x_gmem, codes_gmem, scales_gmem, i, j):
    return (x_gmem.at[:, pl.ds(j * k_part, k_part)],
            codes_gmem.at[pl.ds(i * cta_rows, cta_rows), pl.ds(j * (k_part // 2), k_part // 2)],
            scales_gmem.at[pl.ds(j * (k_part // BLOCK), k_part // BLOCK),
                           pl.ds(i * cta_rows, cta_rows)])

  def kernel(x_gmem, codes_gmem, scales_gmem, lut_gmem, out_gmem, lut_smem, lut_barrier,
             out_smem, *staging):
    wg = lax.axis_index("wg")
    my_rows = pl.ds(wg * ROWS, ROWS)

    @pl.when(wg == 0)
    def _():
      plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, lut_barrier)

    plgpu.barrier_wait(lut_barrier)

    def widen(codes_smem, scales_smem, b):
      return _weight_operand(codes_smem.at[my_rows, pl.ds(b * BLOCK // 2, BLOCK // 2)],
                             scales_smem.at[b, my_rows], lut_smem, table=table,
                             hints=not interpret)

    def multiply(acc_ref, w, x_smem, b):
      register_wgmma(acc_ref, w, x_smem.at[:, pl.ds(b * BLOCK, BLOCK)], wg=wg, staging=staging,
                     interpret=interpret)

    def step(_, x_smem, codes_smem, scales_smem, acc_ref):
      # Widen all the step's blocks first (their table loads independent, latencies overlapped),
      # then issue the wgmmas; their register operands stay intact until the wait.
      ws = [widen(codes_smem, scales_smem, b) for b in range(config.blocks)]
      for b, w in enumerate(ws):
        multiply(acc_ref, w, x_smem, b)
      plgpu.wgmma_wait(0)  # and the pipeline releases x's tile when the step returns
      return acc_ref

    ignore = lambda *_, **__: None
    first = operands(x_gmem, codes_gmem, scales_gmem, 0, 0)

    @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(*first),
                       collective_axes="wg")
    def _(allocations):
      @plgpu.nd_loop((splits, r_tiles), collective_axes="sm")
      def _(loop):
        j, i = loop.index

        def compute_context(run_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((ROWS, cols), jnp.float32))
          def _(acc_ref):
            run_pipeline(acc_ref)
            out = acc_ref[...][:, :out_cols]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's store has read it
            out_smem[wg] = out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg], out_gmem.at[pl.ds(j * n + i * cta_rows + wg * ROWS, ROWS), :])

        pipeline(step, compute_context)(*operands(x_gmem, codes_gmem, scales_gmem, i, j),
                                        allocations=allocations)
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((splits * n, out_cols), jnp.float32),
      grid=(min(sm_count(interpret), splits * r_tiles),), grid_names=("sm",),
      num_threads=config.compute_wgs + 1, thread_name="wg",
      scratch_types=[plgpu.SMEM(lut.shape, jnp.int32), plgpu.Barrier(num_arrivals=1),
                     plgpu.SMEM((config.compute_wgs, ROWS, out_cols), jnp.float32),
                     *interpret_staging(config.compute_wgs, ROWS, BLOCK, cols, interpret)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret),
  )
  return call(x, codes, scales, lut)


def splits_for(n: int, k: int, config: Config, ctas: int | None = None) -> int:
  """Parts of K (a divisor of its steps) that minimize the modelled time: the rounds of work
  items per CTA times each item's steps plus its fixed cost (one item per SM is best when it
  fills the SMs; else several, fewer rounds but more restarts)."""
  steps, tiles = k // (BLOCK * config.blocks), n // (config.compute_wgs * ROWS)
  ctas = ctas or sm_count(False)
  cost = lambda d: -(-tiles * d // ctas) * (steps / d + config.item_cost)  # noqa: E731
  return min((d for d in range(1, steps + 1) if steps % d == 0), key=cost)


def config_for(m: int, k: int) -> Config:
  """x padded to 16, 32 or 64 rows; as many blocks a step as K and shared memory allow."""
  cols = 16 if m <= 16 else 32 if m <= 32 else MAX_ROWS
  blocks = next(b for b in ((4, 2, 1) if cols <= 32 else (2, 1)) if k % (BLOCK * b) == 0)
  return Config(cols=cols, blocks=blocks)


def supported(m: int, n: int, k: int) -> bool:
  return m <= MAX_ROWS and n % (Config.compute_wgs * ROWS) == 0 and k % BLOCK == 0


@functools.partial(jax.jit, static_argnames=("table", "config", "interpret"))
def decode(x_MxK, codes, scales_T, *, table, config: Config | None = None,
           interpret: bool = False):
  """Y [M, N] f32 = x @ W^T for M <= MAX_ROWS, reading bitsandbytes' stored codes as they are.

  codes: uint8 [N, K/2] (even element in the high nibble); scales_T [K/64, N] (cast to bf16).
  config: None picks config_for(M, K)."""
  m, k = x_MxK.shape
  n = codes.shape[0]
  if not supported(m, n, k):
    raise ValueError(f"decode takes at most {MAX_ROWS} rows, N divisible by "
                     f"{Config.compute_wgs * ROWS} and K by {BLOCK}; got x [{m}, {k}], W [{n}, {k}]")
  config = config or config_for(m, k)
  if m > config.cols or k % (BLOCK * config.blocks):
    raise ValueError(f"{config} takes at most {config.cols} rows and K divisible by "
                     f"{BLOCK * config.blocks}; got x [{m}, {k}]")
  x = pad_rows(column_order(x_MxK.astype(jnp.bfloat16)), config.cols)
  splits, out_cols = splits_for(n, k, config, sm_count(interpret)), -(-m // 8) * 8
  parts = _call(x, codes, scales_T.astype(jnp.bfloat16), jnp.asarray(pair_table(table)),
                table=table, config=config, splits=splits, out_cols=out_cols, interpret=interpret)
  return parts.reshape(splits, n, out_cols).sum(0)[:, :m].T
