"""Fused 4-bit dequantize-matmul for training shapes on Hopper: the weight as wgmma's register operand.

Both training products are computed transposed, so that the 4-bit weight is wgmma's A operand,
the one that may come from registers:

  forward   Y^T  [N, M] = W   [N, K] @ X^T  [K, M]      (codes: W packed along K)
  backward  dX^T [K, M] = W^T [K, N] @ dY^T [N, M]      (codes: W^T packed along N)

and the epilogue stores each output tile transposed (a register shuffle, then through shared
memory), so the result comes out as Y [M, N] or dX [M, K], with no XLA transpose. A CTA owns a
[128 weight rows, 256 activation rows] output tile and runs three warpgroups: one issues the TMA
copies (activation tile [256, 64] bf16, code tile [128, 32] bytes, the step's scales) up to
`stages` steps ahead; two compute warpgroups each widen their [64, 64] slice of the weight tile in
registers (gpu_widen: one shared-memory load from a table of bf16 pairs per code byte, times the
block scale in bf16) and issue wgmma(acc [64, 256] f32 += W_tile @ activation_tile^T) on it
straight from registers. No widened weight is ever stored, not even to shared memory. Each
256-row activation tile is shared by 128 weight rows and each widened weight by 256 activation
rows, which halves the widening work per FLOP against 128.

One pipeline step is one quantization block of 64 contraction elements; the codes are packed in
the order the table widens them (layout.fragment_codes), so a [64, 32]-byte tile widens into the
[64, 64] operand in natural column order, one scale per weight row (forward) or per weight column
(backward). The wgmma is skewed one step behind the widening: step s issues the wgmma of step
s - 1 (its widened weight carried over in registers, its tiles released only once that wgmma is
done: manual consumed barriers), widens step s's weight meanwhile, then waits. The CTAs are
persistent, and when every SM has two tiles or more one tile's pipeline runs on into the next
(pipeline_state), so the copies of a tile's first steps start while the previous tile finishes.

Interpreted (CPU tests) the kernels need XLA:CPU's plain scheduler (gpu.SERIAL_XLA_CPU), and since the
interpreter takes wgmma operands from shared memory only, that path stages the widened tile and
the transposed activations there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.gpu import (interpret_params, interpret_staging, register_wgmma, sm_count,
                                 swizzled)
from pallas_kernels.gpu_widen import code_values, pair_table, scaled
from pallas_kernels.layout import BLOCK, pad_rows

EPILOGUE = 64  # output columns per shared-memory store


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


def _weight_operand(codes_smem, lut_smem, scale_smem, *, table, per_row: bool, hints: bool):
  """bf16 [rows, 64] = table[code] * scale of one code tile [rows, 32] (fragment order): the
  scale vector runs along rows (forward) or columns (backward)."""
  values = code_values(codes_smem, lut_smem, block=0, table=table, hints=hints)
  return scaled(values, scale_smem[...], axis=0 if per_row else 1, hints=hints)


def _call(a, codes, scales, lut, *, per_row: bool, table, config: Config, interpret: bool):
  """out [M, R] bf16 = a [M, C] @ widened codes [R, C]^T; see the module docstring.

  per_row (forward): scales [C/64, R], the block scale of weight row r at [c // 64, r];
  else (backward): scales [R/64, C], the block scale of weight row r, column c at [r // 64, c].
  """
  (m, c), r = a.shape, codes.shape[0]
  cta_rows = config.compute_wgs * config.rows
  blocks = c // BLOCK
  if per_row:
    scale_block, scale_index = (1, cta_rows), lambda s: (s, 0)
  else:  # one scale row per compute warpgroup: its 64 weight rows are one block
    assert config.rows == BLOCK
    scale_block, scale_index = (config.compute_wgs, BLOCK), lambda s: (0, s)
  in_specs = [  # one quantization block a step: the activation tile, the codes, the scales
      plgpu.BlockSpec((config.cols, BLOCK), lambda s: (0, s), transforms=swizzled(BLOCK, a.dtype)),
      plgpu.BlockSpec((cta_rows, BLOCK // 2), lambda s: (0, s),
                      transforms=swizzled(BLOCK // 2, codes.dtype)),
      plgpu.BlockSpec(scale_block, scale_index)]

  def pipeline(body, compute_context, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(blocks,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=config.compute_wgs, max_concurrent_steps=config.stages,
        manual_consumed_barriers=True, compute_context=compute_context, pipeline_state=state)

  r_tiles, m_tiles = r // cta_rows, m // config.cols
  grid = min(sm_count(interpret), r_tiles * m_tiles)  # persistent: one CTA per SM

  def operands(a_gmem, codes_gmem, scales_gmem, i, j):
    return (a_gmem.at[pl.ds(j * config.cols, config.cols), :],
            codes_gmem.at[pl.ds(i * cta_rows, cta_rows), :],
            scales_gmem.at[:, pl.ds(i * cta_rows, cta_rows)] if per_row
            else scales_gmem.at[pl.ds(i * config.compute_wgs, config.compute_wgs), :])

  def kernel(a_gmem, codes_gmem, scales_gmem, lut_gmem, out_gmem, lut_smem, lut_barrier, out_smem,
             *staging):
    @pl.when(lax.axis_index("wg") == 0)
    def _():
      plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, lut_barrier)

    plgpu.barrier_wait(lut_barrier)
    ignore = lambda *_, **__: None
    first = operands(a_gmem, codes_gmem, scales_gmem, 0, 0)

    @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(*first),
                       collective_axes="wg")
    def _(allocations):
      wg = lax.axis_index("wg")
      my_rows = pl.ds(wg * config.rows, config.rows)

      a_slots = allocations["flat_in_smem_refs"][0]  # the activation tiles' pipeline slots
      slot = lambda s: lax.rem(s, config.stages)  # noqa: E731

      def release(s):  # this warpgroup is done with step s's tiles
        for consumed in allocations["flat_consumed_barrier_refs"]:
          plgpu.barrier_arrive(consumed.at[slot(s)])

      def multiply(acc_ref, w, s):
        register_wgmma(acc_ref, w, a_slots.at[slot(s)], wg=wg, staging=staging,
                       interpret=interpret)

      def step(indices, a_smem, codes_smem, scales_smem, *consumed_and_carry):
        # Skewed by one step: the wgmma of step s - 1 (its widened weight carried over, its
        # tiles not yet released) runs while step s's weight is widened. Step 0 multiplies
        # zeros (its own activation tile); the tile's last wgmma follows the pipeline.
        acc_ref, w_before = consumed_and_carry[-1]
        s = indices[0]
        multiply(acc_ref, w_before, jnp.maximum(s - 1, 0))
        scale = scales_smem.at[0, my_rows] if per_row else scales_smem.at[wg]
        w = _weight_operand(codes_smem.at[my_rows], lut_smem, scale, table=table,
                            per_row=per_row, hints=not interpret)
        plgpu.wgmma_wait(0)  # w_before's registers are free only now

        @pl.when(s > 0)
        def _():
          release(s - 1)

        return acc_ref, w

      def tile(i, j, state):
        def compute_context(run_pipeline):
          @functools.partial(pl.run_scoped,
                             acc_ref=plgpu.ACC((config.rows, config.cols), jnp.float32))
          def _(acc_ref):
            w_zero = jnp.zeros((config.rows, BLOCK), jnp.bfloat16)
            _, w_last = run_pipeline((acc_ref, w_zero if interpret else
                                      plgpu.layout_cast(w_zero, plgpu.Layout.WGMMA)))
            multiply(acc_ref, w_last, blocks - 1)
            plgpu.wgmma_wait(0)
            release(blocks - 1)
            out = acc_ref[...].astype(out_gmem.dtype)  # [weight rows, activation rows]
            for e in range(config.cols // EPILOGUE):  # stored transposed: out_gmem is [M, R]
              plgpu.wait_smem_to_gmem(1, wait_read_only=True)
              part = out[:, e * EPILOGUE:(e + 1) * EPILOGUE]
              if interpret:
                out_smem[wg, e % 2] = part.T
              else:  # one shuffle and permute per register, then a transposed store
                part = plgpu.layout_cast(part, plgpu.Layout.WGMMA_TRANSPOSED)
                out_smem.at[wg, e % 2].transpose((1, 0))[...] = part
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, e % 2],
                  out_gmem.at[pl.ds(j * config.cols + e * EPILOGUE, EPILOGUE),
                              pl.ds(i * cta_rows + wg * config.rows, config.rows)])

        pipeline(step, compute_context, state)(*operands(a_gmem, codes_gmem, scales_gmem, i, j),
                                               allocations=allocations)

      if config.persistent:
        # With two tiles or more on every SM, one tile's pipeline runs on into the next: the
        # copies of the next tile's first steps start while this tile's last are computed.
        chained = blocks % config.stages == 0 and r_tiles * m_tiles >= 2 * grid

        @plgpu.nd_loop((m_tiles, r_tiles), collective_axes="sm")
        def _(loop):
          j, i = loop.index
          state = jnp.where(loop.local_index == 0, plgpu.PipelinePipeline.START,
                            jnp.where(loop.local_index == loop.num_local_steps - 1,
                                      plgpu.PipelinePipeline.STOP, plgpu.PipelinePipeline.STEADY))
          tile(i, j, state if chained else None)
      else:
        tile(lax.axis_index("i"), lax.axis_index("j"), None)
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, r), a.dtype),
      **(dict(grid=(grid,), grid_names=("sm",))
         if config.persistent else dict(grid=(r_tiles, m_tiles), grid_names=("i", "j"))),
      num_threads=config.compute_wgs + 1, thread_name="wg",
      scratch_types=[plgpu.SMEM(lut.shape, jnp.int32), plgpu.Barrier(num_arrivals=1),
                     plgpu.SMEM((config.compute_wgs, 2, EPILOGUE, config.rows), a.dtype,
                                transforms=swizzled(config.rows, a.dtype)),
                     *interpret_staging(config.compute_wgs, config.rows, BLOCK, config.cols,
                                        interpret)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret),
  )
  return call(a, codes, scales, lut)


def supported(n: int, k: int) -> bool:
  """Both products tile: weight rows by 128 (N forward, K backward), contraction by 64."""
  return n % (2 * BLOCK) == 0 and k % (2 * BLOCK) == 0


def _product(a, codes, scales, per_row, table, config, interpret):
  m = a.shape[0]
  out = _call(pad_rows(a.astype(jnp.bfloat16), config.cols), codes, scales,
              jnp.asarray(pair_table(table)), per_row=per_row, table=table, config=config,
              interpret=interpret)
  return out[:m]


@functools.partial(jax.jit, static_argnames=("table", "config", "interpret"))
def forward(x_MxK, codes, scales_T, *, table, config: Config = Config(), interpret: bool = False):
  """Y [M, N] bf16 = x @ W^T; codes [N, K/2] (layout.fragment_codes), scales_T [K/64, N] (bf16
  or float32: either is rounded to bf16)."""
  return _product(x_MxK, codes, scales_T, True, table, config, interpret)


@functools.partial(jax.jit, static_argnames=("table", "config", "interpret"))
def backward(dy_MxN, codes_T, scales_T, *, table, config: Config = Config(),
             interpret: bool = False):
  """dX [M, K] bf16 = dy @ W; codes_T [K, N/2] (W^T, layout.fragment_codes), scales_T [K/64, N]."""
  return _product(dy_MxN, codes_T, scales_T, False, table, config, interpret)
