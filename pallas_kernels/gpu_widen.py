"""Widening 4-bit codes on chip through a shared-memory table of bf16 pairs (both GPU kernels).

Each code *byte* (two weights) is widened by one shared-memory load from a 256-entry table of
bf16 pairs (table[b >> 4], table[b & 15]), replicated once per bank so that the 32 lanes of a
warp never conflict whatever the codes: one load and about two integer instructions per byte.

A code tile [64, 32 * blocks] bytes is TMA-swizzled with its row width, so each thread's 4-byte
load of a row's half block is bank-conflict free. Byte j of lane t's word in half h widens into
columns (2t, 2t+1) of 8-column group 4h + j of wgmma's register-operand layout, so the widened
[64, 64] tile holds the block's 64 elements in `column_order`: gpu_decode reads bitsandbytes'
bytes as they are and permutes x's columns to match; gpu_matmul's codes are packed with their
bytes in that order (layout.fragment_codes), so its widened tiles are in natural order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from pallas_kernels.gpu import address, swizzled
from pallas_kernels.layout import BLOCK, decode_codes

LANES = 32  # table copies, one per shared-memory bank
ROWS = 64  # weight rows per compute warpgroup (wgmma M)


def column_order(a: jax.Array) -> jax.Array:
  """a with its last axis permuted as the widened tile's columns hold a block's elements.

  Per 32 columns (16 code bytes, a 4-byte word per lane t of a thread quad): column
  32 g + 8 j + 2 t + e holds element 32 g + 8 t + 2 j + e (byte 16 g + 4 t + j, nibble e)."""
  *lead, k = a.shape
  return a.reshape(*lead, k // 32, 4, 4, 2).swapaxes(-3, -2).reshape(*lead, k)


def pair_table(table, *, wide: bool = False) -> np.ndarray:
  """int32 [256, LANES]: entry b = bf16 pair (table[b >> 4], table[b & 15]), once per lane.

  wide: [256, 2 * LANES], the columns past LANES unused (zeros): entries 256 bytes apart, so one
  byte permute (the code byte as the address's second byte, the lane's offset as its first)
  forms a lookup's address instead of an extract and a multiply-add (64 KB instead of 32)."""
  bits = np.asarray(table, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
  b = np.arange(256)
  pairs = (bits[b >> 4] | (bits[b & 15] << 16)).view(np.int32)
  copies = np.repeat(pairs[:, None], LANES, axis=1)
  return np.pad(copies, ((0, 0), (0, LANES))) if wide else copies


def _widen(codes_ref, lut_smem, block: int):
  """bf16 [64, 64] (WGMMA layout) of quantization block `block` of this warpgroup's code rows.

  codes_ref: uint8 [64, 32 * blocks], swizzled with its row width (one 4-byte load per thread,
  row and half block: a warp's 8 rows land in 8 different 16-byte bank groups). The bytes
  4t..4t+3 of half h (t: the lane's column pair) widen into 8-column groups 4h..4h+3, one table
  load each (the lane's copy of the table: no bank conflicts whatever the codes).
  """
  row_bytes = codes_ref.shape[1]
  wide = lut_smem.shape[1] == 2 * LANES  # pair_table(wide=True)
  layout = plgpu.Layout.WGMMA
  out_type = plgpu.ShapeDtypeStruct((ROWS, BLOCK), jnp.bfloat16, layout=layout)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(swizzled(row_bytes, jnp.uint8)), plgpu.RefType()),
                     return_type=out_type)
  def widen_(_, codes, lut):
    i32 = ir.IntegerType.get_signless(32)
    bf16x2 = ir.VectorType.get([2], ir.BF16Type.get())
    # Per thread: the lane's table copy, its first row's address (+ 4 t), the row's swizzle.
    thread = llvm.StructType.get_literal([i32, i32, i32])
    # wide: the lane's offset alone (the table's address is added after the byte permute)
    lane_offset = "mul.lo.u32 $0, l, 4;" if wide else "mad.lo.u32 $0, l, 4, $3;"
    consts = llvm.inline_asm(thread, [address(lut, 32), address(codes, 32)], f"""{{
      .reg .b32 l, w, q;
      mov.u32 l, %laneid;
      {lane_offset}
      mov.u32 w, %tid.x;
      bfe.u32 w, w, 5, 2;
      shr.u32 q, l, 2;
      mad.lo.u32 w, w, 16, q;
      mad.lo.u32 w, w, {row_bytes}, $4;
      and.b32 l, l, 3;
      mad.lo.u32 $1, l, 4, w;
      mul.lo.u32 q, q, {row_bytes};
      bfe.u32 q, q, 7, {(row_bytes // 16).bit_length() - 1};
      shl.b32 $2, q, 4;
    }}""", "=r,=r,=r,r,r")
    lane_lut, row_addr, swizzle = (llvm.extractvalue(i32, consts, [i]) for i in range(3))
    quad = llvm.StructType.get_literal([i32] * 4)
    if wide:  # address = lut + (byte j << 8 | 4 lane): bytes (4 lane, byte j, 0, 0) of ($4, u)
      lookups = "".join(f"prmt.b32 i, u, $4, {0x7604 | j << 4:#x}; add.u32 i, i, $7; "
                        f"ld.shared.b32 ${j}, [i]; " for j in range(4))
    else:
      lookups = "".join(f"bfe.u32 i, u, {8 * j}, 8; mad.lo.u32 i, i, {4 * LANES}, $4; "
                        f"ld.shared.b32 ${j}, [i]; " for j in range(4))
    base = [address(lut, 32)] if wide else []
    out = np.empty(layout.to_mgpu().registers_shape((ROWS, BLOCK)), dtype=object)
    for rh, h in np.ndindex(2, 2):  # row half (rows + 8), half block (16 bytes)
      column = 32 * block + 16 * h
      words = llvm.inline_asm(quad, [lane_lut, row_addr, swizzle, *base], f"""{{
        .reg .b32 a, u, i;
        xor.b32 a, $6, {column};
        add.u32 a, a, $5;
        ld.shared.b32 u, [a+{8 * rh * row_bytes}];
        {lookups}
      }}""", "=r,=r,=r,=r,r,r,r" + ",r" * wide)
      for j in range(4):
        word = llvm.extractvalue(i32, words, [j])
        out[0, 4 * h + j, 0, 0, rh, 0, 0, 0, 0] = mgpu_utils.bitcast(word, bf16x2)
    return mgpu.FragmentedArray(_registers=out, _layout=layout.to_mgpu(), _is_signed=None)

  return widen_(codes_ref, lut_smem)


def code_values(codes_smem, lut_smem, *, block: int, table, hints: bool):
  """bf16 [64, 64]: table[code] of block `block` of a code tile [64, 32 * blocks], columns in
  `column_order`."""
  if hints:
    return _widen(codes_smem, lut_smem, block)
  codes = codes_smem[:, pl.ds(block * BLOCK // 2, BLOCK // 2)].astype(jnp.int32)  # the
  # interpreter runs no inline PTX: a select tree
  natural = jnp.stack([decode_codes(codes >> 4, table), decode_codes(codes & 0xF, table)], -1)
  return column_order(natural.reshape(codes.shape[0], BLOCK)).astype(jnp.bfloat16)


def scaled(values, scale, *, axis: int, hints: bool):
  """bf16 values [64, 64] * scale, a [64] vector along `axis` (0: one per row, 1: per column):
  a bf16 multiply on the GPU; interpreted, the float32 product rounded once to bf16."""
  if hints:
    scale = plgpu.layout_cast(scale, plgpu.Layout.WGMMA.reduce(1 - axis)).astype(jnp.bfloat16)
    return values * lax.broadcast_in_dim(scale, values.shape, [axis])
  scale = lax.broadcast_in_dim(scale.astype(jnp.float32), values.shape, [axis])
  return (values.astype(jnp.float32) * scale).astype(jnp.bfloat16)
