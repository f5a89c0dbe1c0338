"""The kernels' operand layout, made from a bitsandbytes-layout QuantizedArray on the fly.

bitsandbytes packs elements (2j, 2j+1) into byte j. A kernel that widened such bytes on chip would
have to interleave even and odd columns, which neither Mosaic GPU nor Mosaic TPU register layouts
do. The training kernels read a *split* packing instead, so that the two nibbles of a byte tile
widen into two contiguous halves, each one 64-wide slice of one quantization block (one scale):
  - TPU (`kernel_operands`): groups of 128 elements, byte j holding elements j and j + 64;
  - GPU (`gpu_operands`): blocks of 64, byte c holding elements c and c + 32, for W (forward) or
    W^T (backward), whose 64-row tiles are wgmma's register operand (gpu_matmul.py).
The decode kernel (gpu_decode.py) reads the stored codes and absmax as they are (it permutes x
instead, and decodes the absmax itself).

Each is made from the stored weight in one XLA fusion per call: it reads the 4-bit codes and the
double-quantized absmax codes once and writes the split codes (same size) and the float32 scale
per 64 elements (1/16 byte per weight). For these kernels the double-quantized absmax is decoded
here, not in the kernels (gpu_decode shows how a kernel can: per-thread loads of the absmax codes
a step ahead, decoded through a shared-memory qmap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlora_jax.codebooks import CODEBOOKS
from qlora_jax.quantization import QuantizedArray, scales, unpack

GROUP = 128  # elements per split group
HALF = GROUP // 2  # elements per nibble half == bytes per group
BLOCK = 64  # elements per block-split group (gpu_matmul): one quantization block of 64


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


def split_codes(qw: QuantizedArray, group: int = GROUP, transposed: bool = False) -> jax.Array:
  """uint8 [N, K/2] (for `transposed`, W^T's [K, N/2]) packed along the last axis in groups of
  `group` elements, byte j of a group holding element j (high nibble) and j + group/2 (low):
  groups of 128 for the TPU kernels, of 64 (one quantization block) for gpu_matmul."""
  n_rows, k = qw.shape
  codes = unpack(qw.codes, qw.size).reshape(n_rows, k)
  codes = codes.T if transposed else codes
  rows, cols = codes.shape
  halves = codes.reshape(rows, cols // group, 2, group // 2)
  return ((halves[:, :, 0] << 4) | halves[:, :, 1]).reshape(rows, cols // 2)


def half_block_scales(qw: QuantizedArray) -> jax.Array:
  """float32 [K/64, N]: the scale of elements [64 j, 64 j + 64) of row n at [j, n]."""
  n_rows, k = qw.shape
  per_block = scales(qw).reshape(n_rows, k // qw.blocksize)
  return jnp.repeat(per_block, qw.blocksize // HALF, axis=1).T


def codebook(quant_type: str) -> tuple[float, ...]:
  """The 16 code values, as the static (hashable) table the kernels bake in."""
  return tuple(float(v) for v in CODEBOOKS[quant_type])


def gpu_operands(qw: QuantizedArray, product: str) -> tuple[jax.Array, jax.Array]:
  """(block-split codes of W ('forward') or W^T ('backward'), [K/64, N] scales): gpu_matmul's."""
  return split_codes(qw, BLOCK, transposed=product == "backward"), half_block_scales(qw)


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
