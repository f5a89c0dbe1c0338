"""Fused 4-bit dequantize-matmul for decoding (M = 1..64 rows) on Hopper: a shared-memory codebook.

  Y^T [N, m] = W [N, K] @ x_perm^T [K, m]    (m padded to `cols`: 16, 32 or 64)

Decoding is memory-bound: the kernel must stream the 4-bit codes at the copy rate, so what it can
afford per weight is little arithmetic. Here each code *byte* (two weights) is widened by one
shared-memory load from a 256-entry table of bf16 pairs (table[b >> 4], table[b & 15]), replicated
32 times so that every lane of a warp reads its own bank (no conflicts whatever the codes;
gpu_widen.py, which gpu_matmul shares). Its entries are 256 bytes apart (the wide table), so one
byte permute forms each lookup's address: half an integer instruction and half a load per weight.
The widened [64, 64] tile times the row's block scale (bf16) is wgmma's register operand (no
shared-memory store), x's [cols, 64] slice the shared-memory one, acc [64, cols] f32.

The kernel reads bitsandbytes' stored arrays as they are. Codes: a code tile [64, 32 * blocks] is
TMA-swizzled with its row width, so each thread's 4-byte load of a row's half block is bank-
conflict free; byte j of lane t's word in half h widens into columns (2t, 2t+1) of 8-column group
4h + j, so the widened tile's columns are the block's elements in the order of `column_order`, and
x's columns are permuted the same way (x is tiny), not the weight. Absmax: each thread loads its
two rows' absmax codes (one word for the step's blocks) and nested absmax straight from device
memory a step ahead (carried through the pipeline) and decodes them as bitsandbytes does,
qmap[code] (shared memory) * nested + offset (loaded once per CTA), so no per-call XLA pass decodes
the scales.

Warp-specialized: one warpgroup issues the TMA copies (x's tile and a [128, 32 * blocks]-byte code
tile) `stages` steps ahead, `compute_wgs` warpgroups each own 64 weight rows; a step widens all its
blocks, then scales them and issues their wgmmas. Persistent and stream-K (gpu_decode_plan.Split):
one CTA per SM loads the tables once, then runs one pipeline over an equal share of the (row tile,
step of K) pairs, storing its accumulator after each row tile it touches; the wrapper combines the
stores. Weights that share x (q, k, v; gate, up: decode_group) run in one launch, the SMs dealt
among them by rows, each CTA the pipeline of its weight (gpu_decode_plan.Part). The scales'
loads and decoding: gpu_decode_scales.
Measured in docs/kernels.md."""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gpu import interpret_params, interpret_staging, register_wgmma, sm_count, swizzled
from pallas_kernels.gpu_decode_plan import (  # noqa: F401  (MAX_ROWS, SMEM_LIMIT, split_for: gpu_decode's API)
    MAX_ROWS, SMEM_LIMIT, Config, Part, Split, config_for, out_columns, parts_for, smem_bytes,
    split_for, unsupported_reason)
from pallas_kernels.gpu_decode_scales import (  # noqa: F401  (absmax_operands: gpu_decode's API)
    ROW, absmax_operands, decode_scales, load_offset, load_scales)
from pallas_kernels.gpu_widen import ROWS, code_values, column_order, pair_table, scaled
from pallas_kernels.layout import BLOCK, codebook, pad_rows
from qlora_jax.format.quantization import QuantizedArray

NORM_ROW = 64  # norm_input is copied as [K / NORM_ROW, NORM_ROW]: a TMA box of at most 256 rows
NORM_MAX_K = NORM_ROW * 256

def _call(x, weights, lut, norm=None, *, table, config: Config, parts: tuple, out_cols: int,
          h_columns: tuple = (), eps: float = 0.0, interpret: bool):
  """The segments of every weight of a group sharing x, in one launch: [sum of each part's
  split.ctas * split.segments * 128, out_cols] f32, part p's from row part.first_segment * 128;
  its CTA part.first_cta + c stores as CTA c of its Split would alone.

  weights: per part (codes [N, K/2], absmax, dq, lora). absmax: bitsandbytes' flat absmax array
  (uint8 codes with dq = (qmap [256], nested, offset [1]), or float32 with dq = ()): every part
  with dq or none. Persistent: one CTA per SM loads the tables once, then runs one pipeline over
  its `split.per_cta` steps of its part's weight; each time a row tile's last step (or the CTA's
  last) is done, its accumulator is stored (and runs on: Pallas stores no accumulator in a step).

  lora: () or (b [R, N] bf16, h [H, C] bf16), R a multiple of BLOCK, the same R in every part;
  the part's update input is h's R columns from h_columns[p] (the parts' h side by side, the same
  array in every part; H <= cols rows, those past H read as zeros):
  the CTA that runs a row tile's first step of K also adds b[:, rows]^T @ h_p^T to it (a LoRA
  update, h_p = x @ A_p * scaling), one more wgmma per BLOCK of R after the step's blocks, its b
  tile copied to shared memory while they are widened.

  norm: None, or r [K / NORM_ROW, NORM_ROW] bf16, x's one row before its RMS norm (x = r *
  weight): every stored accumulator is multiplied by rsqrt(mean(r^2) + eps), which each compute
  warpgroup reduces from r's copy in shared memory before its first store (the norm's reduction
  in the launch, where XLA would run it as a kernel of its own)."""
  (cols, k), cta_rows = (config.cols, x.shape[1]), config.compute_wgs * ROWS
  dq_len, lora_len = len(weights[0][2]), len(weights[0][3])
  if any(len(w[2]) != dq_len or len(w[3]) != lora_len for w in weights):
    raise ValueError("a group's weights are all double-quantized or none, all with a LoRA update "
                     "or none")
  lora_r = weights[0][3][0].shape[0] if lora_len else 0
  if lora_len and (any(w[3][0].shape[0] != lora_r for w in weights) or len(h_columns) != len(weights)
                   or any(w[3][1].shape[1] < c + lora_r for w, c in zip(weights, h_columns))):
    raise ValueError("a group's LoRA updates share one rank, each part's h columns within its h")
  step_k = BLOCK * config.blocks
  per_part = 2 + dq_len + lora_len

  def kernel(x_gmem, lut_gmem, *rest):
    norm_gmem, *rest = rest if norm is not None else (None, *rest)
    part_refs = [rest[i * per_part:(i + 1) * per_part] for i in range(len(parts))]
    out_gmem, lut_smem, *rest = rest[len(parts) * per_part:]
    qmap_smem, *rest = rest if dq_len else (None, *rest)
    lut_barrier, qmap_barrier, out_smem, *rest = rest
    if lora_len:
      h_smem, b_smem, h_barrier, b_barrier, *rest = rest
    if norm is not None:
      norm_smem, norm_barrier, *rest = rest
    staging = rest
    wg = lax.axis_index("wg")
    my_rows = pl.ds(pl.multiple_of(wg * ROWS, ROWS), ROWS)

    @pl.when(wg == 0)
    def _():  # the table's copy, waited for with the part's copies (run_part)
      plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, lut_barrier)

    rows = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0,  # the interpreter takes no layouts
                                  layout=None if interpret else ROW)

    def run_part(index: int, part: Part, refs, cta):  # this CTA (cta: its index within the part)
      codes_gmem, absmax_gmem, *refs = refs
      split, steps = part.split, part.split.per_cta
      if dq_len:
        qmap_gmem, nested_gmem, offset_gmem, *refs = refs
        dq_refs = (qmap_smem, nested_gmem)  # the offset is loaded once (load_offset)
      else:
        dq_refs = ()
      if lora_len:
        b_gmem, h_gmem = refs

      if config.pdl and not interpret:  # every operand but the pair table (a constant) may be
        plgpu.griddepcontrol_wait()       # an earlier kernel's output (x, h; a scanned layer's slice)

      @pl.when(wg == 0)
      def _():
        if dq_len:
          plgpu.copy_gmem_to_smem(qmap_gmem, qmap_smem, qmap_barrier)
        if norm is not None:
          plgpu.copy_gmem_to_smem(norm_gmem, norm_smem, norm_barrier)
        if lora_len:
          plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(0, cols), pl.ds(h_columns[index], lora_r)],
                                  h_smem, h_barrier)

      def wait_for_tables():  # all three copies in flight at once; the offset loaded once
        plgpu.barrier_wait(lut_barrier)
        if dq_len:
          plgpu.barrier_wait(qmap_barrier)
        if lora_len:
          plgpu.barrier_wait(h_barrier)
        return load_offset(rows, offset_gmem, hints=not interpret) if dq_len else None

      # every warpgroup waits here (the memory one's first copies after the tables), or only the
      # compute ones, in their context below
      offset_first = None if config.tables_under_pipeline else wait_for_tables()

      def global_step(s):  # this CTA's step s in the row-major (row tile, step of K) order
        return cta * steps + s

      def position(s):  # (row tile, step of K) of this CTA's step s; past the end, the last
        g = jnp.minimum(global_step(s), split.total - 1)
        return g // split.tile_steps, g % split.tile_steps

      in_specs = [  # `blocks` quantization blocks a step: x's tile, the code tile
          plgpu.BlockSpec((cols, step_k), lambda s: (0, position(s)[1]),
                          transforms=swizzled(BLOCK, x.dtype)),
          plgpu.BlockSpec((cta_rows, step_k // 2), position,
                          transforms=swizzled(step_k // 2, codes_gmem.dtype))]

      def scales_of(s):  # each row's absmax of step s's blocks, as loaded
        tile, k_step = position(s)
        first = (rows + (tile * cta_rows + wg * ROWS)) * (k // BLOCK) + k_step * config.blocks
        return load_scales(first, absmax_gmem, dq_refs, config.blocks, hints=not interpret)

      def multiply(acc_ref, w, x_smem, b):
        register_wgmma(acc_ref, w, x_smem.at[:, pl.ds(b * BLOCK, BLOCK)], wg=wg, staging=staging,
                       interpret=interpret)

      def fetch_lora(tile):  # b[:, this warpgroup's rows of `tile`] to shared memory (async)
        plgpu.copy_gmem_to_smem(b_gmem.at[:, pl.ds(tile * cta_rows + wg * ROWS, ROWS)],
                                b_smem.at[wg], b_barrier.at[wg])

      def add_lora(acc_ref):  # acc += the fetched b tile^T @ h^T
        plgpu.barrier_wait(b_barrier.at[wg])
        for c in range(lora_r // BLOCK):
          b_c = b_smem.at[wg, pl.ds(c * BLOCK, BLOCK), :]  # [BLOCK, 64 rows]
          h_c = h_smem.at[:, pl.ds(c * BLOCK, BLOCK)]
          if interpret:  # the interpreter reads no transposed ref: b^T as a register array
            register_wgmma(acc_ref, b_c[...].T, h_c, wg=wg, staging=staging, interpret=True)
          else:
            plgpu.wgmma(acc_ref, b_c.transpose((1, 0)), h_c.transpose((1, 0)))
        plgpu.wgmma_wait(0)

      def store(acc, tile, inv_rms):  # this CTA's accumulator after row tile `tile`
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store has read out_smem
        out_smem[wg] = acc[:, :out_cols] if inv_rms is None else acc[:, :out_cols] * inv_rms
        plgpu.commit_smem()
        segment = part.first_segment + cta * split.segments + tile - split.first_tile(cta)
        plgpu.copy_smem_to_gmem(
            out_smem.at[wg], out_gmem.at[pl.ds(segment * cta_rows + wg * ROWS, ROWS), :])

      def step(indices, x_smem, codes_smem, carry):
        # The next step's scale loads first, then all this step's blocks widened (their table
        # loads independent), then scaled and multiplied; the wgmmas' register operands stay
        # intact until the wait.
        acc_ref, loaded, offset, inv_rms = carry
        s = indices[0]
        tile, k_step = position(s)
        # a row tile's LoRA update, once: by the CTA that runs its first step of K, its b tile
        # fetched now and used after this step's blocks (the copy under their widening)
        adds_lora = (k_step == 0) & (global_step(s) < split.total)
        if lora_len:
          pl.when(adds_lora)(lambda: fetch_lora(tile))
        loaded_next = scales_of(jnp.minimum(s + 1, steps - 1))
        scales = decode_scales(loaded, dq_refs, config.blocks, offset=offset,
                                hints=not interpret)
        values = [code_values(codes_smem.at[my_rows], lut_smem, block=b, table=table,
                               hints=not interpret) for b in range(config.blocks)]
        for b, (v, scale) in enumerate(zip(values, scales)):
          multiply(acc_ref, scaled(v, scale, axis=0, hints=not interpret), x_smem, b)
        plgpu.wgmma_wait(0)  # and the pipeline releases x's tile when the step returns
        if lora_len:
          pl.when(adds_lora)(lambda: add_lora(acc_ref))

        @pl.when(((k_step == split.tile_steps - 1) | (s == steps - 1))
                 & (global_step(s) < split.total))
        def _():
          store(acc_ref[...], tile, inv_rms)

        return acc_ref, loaded_next, offset, inv_rms

      def compute_context(run_pipeline):  # the compute warpgroups' (the memory one's copies start)
        offset = wait_for_tables() if config.tables_under_pipeline else offset_first
        inv_rms = None
        if norm is not None:  # 1 / rms of x's pre-norm input (one row), each warpgroup its own
          plgpu.barrier_wait(norm_barrier)
          v = norm_smem[...].astype(jnp.float32)
          inv_rms = lax.rsqrt(jnp.sum(v * v) / k + eps)

        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((ROWS, cols), jnp.float32))
        def _(acc_ref):
          run_pipeline((acc_ref, scales_of(0), offset, inv_rms))

      plgpu.emit_pipeline_warp_specialized(
          step, grid=(steps,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
          num_compute_wgs=config.compute_wgs, max_concurrent_steps=config.stages,
          compute_context=compute_context)(x_gmem, codes_gmem)

    sm = lax.axis_index("sm")
    if len(parts) == 1:
      run_part(0, parts[0], part_refs[0], sm)
    else:  # each CTA runs the pipeline of the part it belongs to
      for index, (part, refs) in enumerate(zip(parts, part_refs)):
        pl.when((sm >= part.first_cta) & (sm < part.first_cta + part.split.ctas))(
            functools.partial(run_part, index, part, refs, sm - part.first_cta))
    if config.pdl and not interpret:
      plgpu.griddepcontrol_launch_dependents()
    plgpu.wait_smem_to_gmem(0)

  segments = sum(part.split.ctas * part.split.segments for part in parts)
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((segments * cta_rows, out_cols), jnp.float32),
      grid=(sum(part.split.ctas for part in parts),), grid_names=("sm",),
      num_threads=config.compute_wgs + 1, thread_name="wg",
      scratch_types=[plgpu.SMEM(lut.shape, jnp.int32),
                     *([plgpu.SMEM((256,), jnp.float32)] if dq_len else []),
                     plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1),
                     plgpu.SMEM((config.compute_wgs, ROWS, out_cols), jnp.float32),
                     *([plgpu.SMEM((cols, lora_r), jnp.bfloat16,
                                   transforms=swizzled(BLOCK, jnp.bfloat16)),
                        plgpu.SMEM((config.compute_wgs, lora_r, ROWS), jnp.bfloat16,
                                   transforms=swizzled(ROWS, jnp.bfloat16)),
                        plgpu.Barrier(num_arrivals=1),
                        plgpu.Barrier(num_arrivals=1, num_barriers=config.compute_wgs)]
                       if lora_len else []),
                     *([plgpu.SMEM(norm.shape, jnp.bfloat16), plgpu.Barrier(num_arrivals=1)]
                       if norm is not None else []),
                     *interpret_staging(config.compute_wgs, ROWS, BLOCK, cols, interpret)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret),
  )
  return call(x, lut, *([] if norm is None else [norm]),
              *(a for codes, absmax, dq, lora in weights for a in (codes, absmax, *dq, *lora)))


def decode(x_MxK, qw: QuantizedArray, lora=None, *, config: Config | None = None,
           interpret: bool = False):
  """Y [M, N] f32 = x @ dequant(qw)^T (+ h @ b) for M <= MAX_ROWS, reading bitsandbytes' stored
  arrays as they are: the 4-bit codes, and the absmax (double-quantized or not), decoded in the
  kernel. lora: None, or (h [H, r], b [r, N]) whose product the kernel adds (a LoRA update with
  its scaling in h; bf16 operands, float32 accumulation with the base product); h has M rows or
  more (up to the kernel's `cols`: the rows past M reach only output rows that are dropped, so a
  one-row x may come with the 8 equal rows of its A product, `xla.broadcast_dot`). config: None
  picks config_for(M, K)."""
  update = None if lora is None else (lora[0], (lora[1],))
  return decode_group(x_MxK, (qw,), update, config=config, interpret=interpret)[0]


def unshared_reason(qws) -> str | None:
  """Why weights that decode alone cannot share one launch (None if they can): one input width,
  codebook and double quantization."""
  if len({(qw.shape[1], qw.quant_type, qw.double_quant) for qw in qws}) > 1:
    return ("a group's weights share one input width, codebook and double quantization; got "
            + ", ".join(f"{qw.shape} {qw.quant_type} dq={qw.double_quant}" for qw in qws))
  return None


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def decode_group(x_MxK, qws: tuple, update: tuple | None = None, norm_input=None, *,
                 eps: float = 0.0, config: Config | None = None, interpret: bool = False) -> tuple:
  """(Y_i [M, N_i] f32 = x @ dequant(qws[i])^T (+ h_i @ b_i), ...) in one launch: the weights that
  share an input (q, k, v; gate, up) as one kernel, the SMs dealt among them by their rows
  (parts_for); each as decode computes it alone. update: None, or (h, (b_i [r, N_i], ...)), one
  rank r, h the G updates' inputs: one array [H, G * r] side by side (h_i = h[:, i * r:(i + 1) *
  r], one A product of the weights' A side by side, read in place); H >= M rows (see decode).
  norm_input: None,
  or r [1, K] (one row: M = 1, K at most NORM_MAX_K), x's input before its RMS norm (x = r *
  weight): each product (and update) times rsqrt(mean(r^2) + eps), computed in the launch."""
  (m, k), ns = x_MxK.shape, tuple(qw.shape[0] for qw in qws)
  lora_rank = 0 if update is None else update[1][0].shape[0]
  if update is not None:
    h, bs = update
    if (len(bs) != len(qws) or any(b.shape != (lora_rank, n) for b, n in zip(bs, ns))
        or h.ndim != 2 or not m <= h.shape[0] <= MAX_ROWS or h.shape[1] != len(qws) * lora_rank):
      raise ValueError(f"LoRA updates h {h.shape}, b {[b.shape for b in bs]} for x [{m}, {k}] @ "
                       f"W_i^T, N_i = {ns}: they need b_i [r, N_i] of one rank r and h [H, "
                       f"{len(qws)} * r] (the updates' inputs side by side), H >= {m} rows")
  if norm_input is not None and (m != 1 or norm_input.shape != (1, k) or k > NORM_MAX_K):
    raise ValueError(f"the norm in the launch takes one row of x and its pre-norm input [1, K <= "
                     f"{NORM_MAX_K}]; got x [{m}, {k}], norm input {norm_input.shape}")
  reasons = [unsupported_reason(m, qw, lora_rank) for qw in qws] + [unshared_reason(qws)]
  if reason := next((r for r in reasons if r is not None), None):
    raise ValueError(reason)
  config = config or config_for(m, k, lora_rank)
  if max(m, 0 if update is None else h.shape[0]) > config.cols or k % (BLOCK * config.blocks):
    raise ValueError(f"{config} takes at most {config.cols} rows and K divisible by "
                     f"{BLOCK * config.blocks}; got x [{m}, {k}]")
  norm_k = 0 if norm_input is None else k
  if (need := smem_bytes(config, m, lora_rank, qws[0].double_quant, norm_k)) > SMEM_LIMIT:
    raise ValueError(f"{config} for x [{m}, {k}] (LoRA rank {lora_rank}) needs {need} bytes of "
                     f"shared memory (a CTA holds at most {SMEM_LIMIT})")
  # compiled, TMA zero-fills x's and h's rows past M (up to cols): no pad kernel a call, only
  # rows to a multiple of its 8-row tiling past 8 (interpreted, whole tiles of cols rows)
  def rows_to(a):
    return pad_rows(a, config.cols if interpret else (1 if a.shape[0] < 8 else 8))

  x = rows_to(column_order(x_MxK.astype(jnp.bfloat16)))
  parts, out_cols = parts_for(ns, k, config, sm_count(interpret)), out_columns(m)
  table = codebook(qws[0].quant_type)
  lut = jnp.asarray(pair_table(table, wide=config.wide_table))
  extra = -lora_rank % BLOCK  # the rank in whole blocks: zero columns of each h_i, rows of b_i
  if update is not None:
    # each h_i's columns to the rank in whole blocks, the rows as TMA takes them
    h = h.astype(jnp.bfloat16)
    if extra:
      h = jnp.pad(h.reshape(h.shape[0], -1, lora_rank), ((0, 0), (0, 0), (0, extra)))
    h = rows_to(h.reshape(h.shape[0], -1))
    h_columns = tuple(i * (lora_rank + extra) for i in range(len(qws)))  # every part its columns
  weights = []
  for i, (qw, n) in enumerate(zip(qws, ns)):
    lora = ()
    if update is not None:
      lora = (jnp.pad(update[1][i].astype(jnp.bfloat16), ((0, extra), (0, 0))), h)
    weights.append((qw.codes.reshape(n, k // 2), *absmax_operands(qw), lora))
  norm = None if norm_input is None else norm_input.astype(jnp.bfloat16).reshape(-1, NORM_ROW)
  stored = _call(x, tuple(weights), lut, norm, table=table, config=config, parts=parts,
                 out_cols=out_cols, h_columns=h_columns if update is not None else (), eps=eps,
                 interpret=interpret)
  out = []
  for part, n in zip(parts, ns):
    split, first = part.split, part.first_segment * config.compute_wgs * ROWS
    mine = stored[first:first + split.ctas * split.segments * config.compute_wgs * ROWS]
    tiles = split.combine(mine.reshape(split.ctas, split.segments, -1, out_cols))
    out.append(tiles.reshape(n, out_cols)[:, :m].T)
  return tuple(out)
