"""One query's attention over a KV cache in one launch on Hopper (Mosaic GPU): generation's step.

  out [B, 1, N, H] = softmax(q k^T * scale + bias) v,  k, v [B, S, KV, H], N = KV * G

XLA runs a decoding step's attention as five kernels a layer (the score GEMM, the softmax, the
value GEMM and two transposes of its [KV, H, G] output); here one CTA per (batch row, KV head)
holds the group's G queries (rows of a 64-row wgmma tile, the rest never stored) and streams the
cache's keys and values in blocks of 64 slots through a two-stage TMA pipeline, with the online
softmax of flash attention in float32 (scores scaled by log2(e) for exp2). The bias carries the
mask (0 or a large negative, never -inf: a block of masked slots then still has a finite max).
Only the group's rows are stored, in q's head order, so o_proj's A product reads the output as it
is.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gpu import interpret_params, swizzled
from pallas_kernels.gpu_decode_plan import SMEM_LIMIT

ROWS = 64  # a wgmma tile's rows: the group's queries among them, the others never stored
TILE_ROWS = 8  # rows of q's swizzle tile: where a TMA copy into it may start
BLOCK = 64  # cache slots a pipeline step
MASKED = -1e30  # the bias of a masked slot: finite, so exp2 of a masked block's scores is 0, not NaN
PART = 512  # cache slots a CTA at most: a longer cache is split among more CTAs (`parts`; 16 parts
# of a KV head at 8,192 slots: 128 CTAs for 8 KV heads, about an H100's SMs)


def tile_rows(group: int) -> int:
  """Rows of q's tile a group may span: it starts where its first query is within a swizzle tile
  of rows (a group not a multiple of 8 queries starts anywhere but at the tile's last row)."""
  return group if group % TILE_ROWS == 0 else group + TILE_ROWS - 1


def parts(slots: int, part: int = PART) -> int:
  """Into how many CTAs a cache of `slots` slots is split (each a whole number of blocks)."""
  blocks = slots // BLOCK
  return next(p for p in range(-(-slots // part), blocks + 1) if blocks % p == 0)


def smem_bytes(h: int, splits: int) -> int:
  """Shared memory a CTA takes: q's tile, the output's (float32 output and log-sum-exp where the
  cache is split), two pipeline stages of a key, a value and a bias block."""
  out = ROWS * h * 2 if splits == 1 else 2 * ROWS * h * 4
  return ROWS * h * 2 + out + 2 * (2 * BLOCK * h * 2 + BLOCK * 4)


def unsupported_reason(q_shape, k_shape, dtype, part: int = PART) -> str | None:
  """Why decode_attention cannot take q [B, T, N, H] against k, v [B, S, KV, H] (None if it can)."""
  (_, t, n, h), (_, s, kv, _) = q_shape, k_shape
  if t != 1 or n % kv or tile_rows(n // kv) > ROWS or h % 64 or h > 256 or s % BLOCK:
    return (f"decode_attention takes one query, at most {ROWS - TILE_ROWS + 1} query heads a KV "
            f"head (or {ROWS}, a multiple of {TILE_ROWS}), a head "
            f"width a multiple of 64 up to 256 and cache slots a multiple of {BLOCK}; got q "
            f"{tuple(q_shape)}, k {tuple(k_shape)}")
  if jnp.dtype(dtype) != jnp.bfloat16:
    return f"decode_attention takes bf16; got {jnp.dtype(dtype)}"
  if (need := smem_bytes(h, parts(s, part))) > SMEM_LIMIT:
    return (f"decode_attention for heads of {h} over {s} slots in {parts(s, part)} parts needs "
            f"{need} bytes of shared memory (a CTA holds at most {SMEM_LIMIT})")
  return None


@functools.partial(jax.jit, static_argnames=("scale", "part", "interpret"))
def decode_attention(q, k, v, bias, *, scale: float, part: int = PART, interpret: bool = False):
  """out [B, 1, N, H] in q's dtype for q [B, 1, N, H], k, v [B, S, KV, H] (the cache) and bias
  [B, S] float32 (0 where a slot is attended, a large negative where masked: `bias_of`). A cache
  longer than `part` slots is split among CTAs (flash decoding): each stores its part's output
  (normalized, float32) and log-sum-exp, and XLA combines them (one fusion)."""
  if (reason := unsupported_reason(q.shape, k.shape, q.dtype, part)) is not None:
    raise ValueError(reason)
  b, _, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  group, splits = n // kv, parts(s, part)
  per = s // splits
  q2d = q.reshape(b * n, h)
  if interpret:  # the interpreter reads no rows past the end (a TMA copy reads them as zeros)
    q2d = jnp.pad(q2d, ((0, ROWS), (0, 0)))
  k2d, v2d = k.reshape(b * s, kv * h), v.reshape(b * s, kv * h)
  log2e = math.log2(math.e)
  tile = swizzled(h, jnp.bfloat16)

  def kernel(q_ref, k_ref, v_ref, bias_ref, *rest):
    if splits == 1:
      (out_ref, q_smem, o_smem, q_barrier, *staging), lse_ref = rest, None
    else:
      out_ref, lse_ref, q_smem, o_smem, q_barrier, *staging = rest
    cta = lax.axis_index("cta")
    pair, piece = cta // splits, cta % splits  # (batch row, KV head), part of the cache
    row, head = pair // kv, pair % kv
    # q's tile starts at a whole swizzle tile of rows (TMA into a tiled buffer): the group's
    # queries are its rows from `first` (0 unless the group is not a multiple of 8 rows)
    start = row * n + head * group
    first = start % TILE_ROWS
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(pl.multiple_of(start - first, TILE_ROWS), ROWS)],
                            q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def step(_, k_smem, v_smem, bias_smem, carry):
      acc, top, total = carry

      def scores(acc_ref):
        if interpret:  # the interpreter takes no transposed operand: k^T staged in shared memory
          staging[0][...] = k_smem[...].T
          plgpu.commit_smem()
          plgpu.wgmma(acc_ref, q_smem, staging[0])
        else:
          plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        return acc_ref[...]
      qk = pl.run_scoped(scores, plgpu.ACC((ROWS, BLOCK), jnp.float32))
      bias = (bias_smem[...] if interpret else
              plgpu.load(bias_smem, (), layout=plgpu.Layout.WGMMA.reduce(0)))
      logits = qk * (scale * log2e) + lax.broadcast_in_dim(bias * log2e, qk.shape, [1])
      new_top = jnp.maximum(top, logits.max(axis=1))
      alpha = jnp.exp2(top - new_top)
      p = jnp.exp2(logits - lax.broadcast_in_dim(new_top, logits.shape, [0]))
      total = total * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(jnp.bfloat16)

      if interpret:  # nor a register operand (p staged in shared memory), nor an initialized ACC
        staging[1][...] = p16
        plgpu.commit_smem()

        def values(acc_ref):
          plgpu.wgmma(acc_ref, staging[1], v_smem)
          return acc_ref[...]
        acc = acc + pl.run_scoped(values, plgpu.ACC((ROWS, h), jnp.float32))
      else:
        acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p16, v_smem))(plgpu.ACC.init(acc))
      return acc, new_top, total

    init = (jnp.zeros((ROWS, h), jnp.float32), jnp.full((ROWS,), -jnp.inf, jnp.float32),
            jnp.zeros((ROWS,), jnp.float32))
    if not interpret:  # the carry in the layouts the step returns it in (wgmma's, its rows')
      layouts = (plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(1))
      init = tuple(plgpu.layout_cast(a, layout) for a, layout in zip(init, layouts))
    pipeline = plgpu.emit_pipeline(
        step, grid=(per // BLOCK,), max_concurrent_steps=2, init_carry=init,
        in_specs=[plgpu.BlockSpec((BLOCK, h), lambda j: (j, 0), transforms=tile),
                  plgpu.BlockSpec((BLOCK, h), lambda j: (j, 0), transforms=tile),
                  plgpu.BlockSpec((BLOCK,), lambda j: (j,))])
    cache_rows, cols = pl.ds(row * s + piece * per, per), pl.ds(head * h, h)
    acc, top, total = pipeline(k_ref.at[cache_rows, cols], v_ref.at[cache_rows, cols],
                               bias_ref.at[row, pl.ds(piece * per, per)])
    out = acc / lax.broadcast_in_dim(total, acc.shape, [0])
    mine = pl.ds(start, group)  # the group's rows only, in q's head order: no slicing after
    if splits == 1:
      o_smem[...] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(first, group)], out_ref.at[mine])
    else:  # the part's output and its log2-sum-exp2 (across each row: a box wide enough for TMA)
      o_smem[0] = out
      o_smem[1] = lax.broadcast_in_dim(top + jnp.log2(total), acc.shape, [0])
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[0, pl.ds(first, group)], out_ref.at[piece, mine])
      plgpu.copy_smem_to_gmem(o_smem.at[1, pl.ds(first, group)], lse_ref.at[piece, mine])
    plgpu.wait_smem_to_gmem(0)

  staging = ([plgpu.SMEM((h, BLOCK), jnp.bfloat16, transforms=swizzled(BLOCK, jnp.bfloat16)),
              plgpu.SMEM((ROWS, BLOCK), jnp.bfloat16, transforms=swizzled(BLOCK, jnp.bfloat16))]
             if interpret else [])
  if splits == 1:
    out_type, o_type = jax.ShapeDtypeStruct((b * n, h), jnp.bfloat16), plgpu.SMEM((ROWS, h), jnp.bfloat16)
  else:
    out_type = [jax.ShapeDtypeStruct((splits, b * n, h), jnp.float32)] * 2
    o_type = plgpu.SMEM((2, ROWS, h), jnp.float32)
  out = plgpu.kernel(
      kernel, out_type=out_type, grid=(b * kv * splits,), grid_names=("cta",),
      scratch_types=[plgpu.SMEM((ROWS, h), jnp.bfloat16, transforms=tile),
                     o_type,  # untiled: a copy of the group's G rows from `first`
                     plgpu.Barrier(num_arrivals=1), *staging],
      interpret=interpret_params(interpret),
  )(q2d, k2d, v2d, bias.astype(jnp.float32))
  if splits > 1:  # the parts weighted by their share of the softmax's sum
    parts_out, lse = out
    lse = lse[..., :1]
    weight = jnp.exp2(lse - jnp.max(lse, axis=0, keepdims=True))
    out = jnp.sum(weight * parts_out, axis=0) / jnp.sum(weight, axis=0)
  return out.reshape(b, 1, n, h).astype(q.dtype)


def bias_of(mask):
  """[B, S] float32 bias of a decoding step's bool mask [B, 1, S]: 0 where attended."""
  return jnp.where(mask[:, 0], 0.0, MASKED).astype(jnp.float32)
