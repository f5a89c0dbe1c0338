"""The kernels' operand layout, made from a bitsandbytes-layout QuantizedArray on the fly.

bitsandbytes packs elements (2j, 2j+1) into byte j. The training kernels read their own packing,
the order in which their widening produces a tile's columns:
  - TPU (`kernel_operands`): a *split* packing, groups of 128 elements, byte j holding elements j
    and j + 64, so that the two nibbles of a byte tile widen into two contiguous halves (Mosaic
    TPU's register layouts do not interleave even and odd columns);
  - GPU (`gpu_operands`, gpu_matmul.py): bitsandbytes' pairs (elements 2p, 2p + 1 in byte p) of
    W (forward) or W^T (backward), each row's bytes transposed 4 x 4 within every 16 so that
    the shared-memory pair table (gpu_widen.py) widens them into natural column order.
The decode kernel (gpu_decode.py) reads the stored codes and absmax as they are (it permutes x
instead, and decodes the absmax itself).

Each is made from the stored weight in one XLA fusion per call: it reads the 4-bit codes and the
double-quantized absmax codes once and writes the packed codes (same size) and the scale per 64
elements (float32 for TPU, bf16 for gpu_matmul: 1/16 or 1/32 byte per weight). For these
kernels the double-quantized absmax is decoded here, not in the kernels (gpu_decode shows how a
kernel can: per-thread loads of the absmax codes a step ahead, decoded through a shared-memory
qmap).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from qlora_jax.format.codebooks import CODEBOOKS
from qlora_jax.format.quantization import QuantizedArray, scales, unpack

GROUP = 128  # elements per split group
HALF = GROUP // 2  # elements per nibble half == bytes per group
BLOCK = 64  # elements per quantization block the GPU kernels take


def unsupported_reason(qw: QuantizedArray) -> str | None:
  """Why the kernels cannot take this weight (None if they can)."""
  if len(qw.shape) != 2:
    return f"weight of rank {len(qw.shape)} (kernels take [out, in])"
  n_rows, k = qw.shape
  if k % GROUP:
    return f"in_features {k} is not a multiple of {GROUP}"
  if qw.blocksize % HALF:
    return f"blocksize {qw.blocksize} is not a multiple of {HALF}"
  return None


def split_codes(qw: QuantizedArray) -> jax.Array:
  """uint8 [N, K/2] packed along K in groups of 128 elements, byte j of a group holding element
  j (high nibble) and j + 64 (low): the TPU kernels' layout."""
  n_rows, k = qw.shape
  halves = unpack(qw.codes, qw.size).reshape(n_rows, k // GROUP, 2, HALF)
  return ((halves[:, :, 0] << 4) | halves[:, :, 1]).reshape(n_rows, k // 2)


def fragment_codes(qw: QuantizedArray, transposed: bool = False) -> jax.Array:
  """uint8 [N, K/2] (for `transposed`, W^T's [K, N/2]): elements (2p, 2p + 1) in byte p as
  bitsandbytes packs them, with byte 16 g + 4 t + j of a row moved to 16 g + 4 j + t. Lane t of a
  thread quad loads bytes 4t..4t+3 of a 16-byte group and widens byte j into wgmma's columns
  8 j + 2 t, + 1 (gpu_widen.column_order): these bytes hold exactly those elements."""
  if transposed:
    return _transposed_fragment_codes(qw)
  rows, cols = qw.shape[0], qw.shape[1] // 2  # the 4 x 4 byte transposes, on 32-bit words:
  words = lax.bitcast_convert_type(qw.codes.reshape(rows, cols // 16, 4, 4), jnp.uint32)
  moved = [functools.reduce(operator.or_, [(words[..., j] >> 8 * t & 0xFF) << 8 * j
                                           for j in range(4)]) for t in range(4)]
  return lax.bitcast_convert_type(jnp.stack(moved, -1), jnp.uint8).reshape(rows, cols)


def _transposed_fragment_codes(qw: QuantizedArray) -> jax.Array:
  """fragment_codes of W^T: word t of 16-byte group g in row k of W^T holds, in byte j,
  W[32 g + 8 j + 2 t, k] (high nibble) and W[32 g + 8 j + 2 t + 1, k] (low).

  Made row-local first, then transposed: each such word gathers one nibble from the 32-bit words
  of 8 rows of W at one column word c (elements 8c..8c+7), so the 8 words of W^T rows 8c..8c+7
  are an 8 x 8 nibble transpose of those 8 words (reads coalesced along K); the result,
  [N/8, K] words, then takes one 32-bit transpose, the unit XLA transposes fast (faster than
  transposing first: docs/kernels.md)."""
  n_rows, k = qw.shape  # words[g, j, t, e, c]: row 32 g + 8 j + 2 t + e, elements 8c..8c+7
  words = lax.bitcast_convert_type(qw.codes.reshape(n_rows // 32, 4, 4, 2, k // 8, 4), jnp.uint32)

  def row_of_transpose(i):  # [g, t, c]: the word (g, t) of W^T's row 8 c + i
    shift = 8 * (i // 2) + 4 * (1 - i % 2)  # element 8c + i's nibble in its word (high first)
    return functools.reduce(operator.or_, [
        (words[:, j, :, e] >> shift & 0xF) << (8 * j + 4 * (1 - e)) for j in range(4)
        for e in range(2)])

  by_row = jnp.stack([row_of_transpose(i) for i in range(8)], -1).reshape(n_rows // 8, k)
  return lax.bitcast_convert_type(by_row.T, jnp.uint8).reshape(k, n_rows // 2)


def half_block_scales(qw: QuantizedArray) -> jax.Array:
  """float32 [K/64, N]: the scale of elements [64 j, 64 j + 64) of row n at [j, n]."""
  n_rows, k = qw.shape
  per_block = scales(qw).reshape(n_rows, k // qw.blocksize)
  return jnp.repeat(per_block, qw.blocksize // HALF, axis=1).T


def codebook(quant_type: str) -> tuple[float, ...]:
  """The 16 code values, as the static (hashable) table the kernels bake in."""
  return tuple(float(v) for v in CODEBOOKS[quant_type])


def gpu_operands(qw: QuantizedArray, product: str) -> tuple[jax.Array, jax.Array]:
  """(fragment-order codes of W ('forward') or W^T ('backward'), [K/64, N] scales in bf16, the
  precision the kernel multiplies in): gpu_matmul's."""
  return (fragment_codes(qw, transposed=product == "backward"),
          half_block_scales(qw).astype(jnp.bfloat16))


def kernel_operands(qw: QuantizedArray, transposed: bool) -> tuple[jax.Array, jax.Array]:
  """(split codes, [K/64, N] scales); codes as [K/2, N] when `transposed`, else [N, K/2]."""
  codes = split_codes(qw)
  return (codes.T if transposed else codes), half_block_scales(qw)


def decode_codes(codes_i32: jax.Array, table) -> jax.Array:
  """float32 value of each 4-bit code: a 15-select tree over the code's bits (no gather)."""
  low = ((codes_i32 & 1) != 0)
  level = [jnp.where(low, jnp.float32(table[2 * j + 1]), jnp.float32(table[2 * j]))
           for j in range(8)]
  for bit in range(1, 4):
    set_ = ((codes_i32 >> bit) & 1) != 0
    level = [jnp.where(set_, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
  return level[0]


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  """x [M, C] with zero rows appended up to a multiple of `multiple` (kernels tile M whole)."""
  pad = -x.shape[0] % multiple
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x
