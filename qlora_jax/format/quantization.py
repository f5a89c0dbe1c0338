"""Blockwise 4-bit quantization (NF4, FP4, INT4) with double-quantized scales, bit-identical to
bitsandbytes 0.50.

Layout (bitsandbytes'): the tensor is flattened row-major and cut into blocks of `blocksize`
consecutive elements (the last block may be partial). Per block, absmax = max|x| in float32 and
each element becomes a 4-bit code of x / absmax; two codes per byte, the even element in the high
nibble. With double quantization the float32 absmax vector is itself quantized: offset = its
mean, then (absmax - offset) in blocks of 256 with the signed 8-bit dynamic map, one float32
nested absmax per 256 blocks.

All-zero blocks: absmax is 0, every code is the codebook's zero and dequantization gives exact
zeros (bitsandbytes' CUDA path can produce NaN there; we never do). A subnormal absmax is treated
as any other nonzero absmax (XLA may flush it to zero on accelerators).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qlora_jax.format import codebooks, ieee
from qlora_jax.format.reduction import torch_cpu_mean


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How base weights are quantized (the QLoRA paper's defaults)."""

  quant_type: str = "nf4"
  blocksize: int = 64
  double_quant: bool = True

  def __post_init__(self):
    if self.quant_type not in codebooks.QUANT_TYPES:
      raise ValueError(f"quant_type must be one of {codebooks.QUANT_TYPES}, got {self.quant_type!r}")
    if self.blocksize not in codebooks.BLOCKSIZES:
      raise ValueError(f"blocksize must be one of {codebooks.BLOCKSIZES}, got {self.blocksize!r}")

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@struct.dataclass
class QuantizedArray:
  """A 4-bit blockwise-quantized tensor: a pytree whose leaves are the stored arrays.

  Attributes:
    codes: uint8[(n + 1) // 2], two 4-bit codes per byte, even element in the high nibble.
    absmax: per-block scales: uint8[num_blocks] codes with double quantization, else float32.
    quant_map: float32[16], the 4-bit codebook (value of each code).
    nested_absmax: float32[ceil(num_blocks / 256)] (double quantization only, else None).
    nested_quant_map: float32[256], the 8-bit map of the absmax codes (else None).
    offset: float32 scalar added back to the dequantized absmax (else None).
    shape, dtype, quant_type, blocksize, nested_blocksize: static metadata.
  """

  codes: jax.Array
  absmax: jax.Array
  quant_map: jax.Array
  nested_absmax: jax.Array | None = None
  nested_quant_map: jax.Array | None = None
  offset: jax.Array | None = None
  shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
  dtype: str = struct.field(pytree_node=False, default="bfloat16")
  quant_type: str = struct.field(pytree_node=False, default="nf4")
  blocksize: int = struct.field(pytree_node=False, default=64)
  nested_blocksize: int = struct.field(pytree_node=False, default=codebooks.NESTED_BLOCKSIZE)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def num_blocks(self) -> int:
    return -(-self.size // self.blocksize)

  @property
  def double_quant(self) -> bool:
    return self.nested_absmax is not None

  @property
  def nbytes(self) -> int:
    """Bytes of per-tensor storage: codes, scales, nested scales and offset.

    The codebooks (64 + 1024 bytes) are shared constants of the format and not counted.
    """
    leaves = [self.codes, self.absmax, self.nested_absmax, self.offset]
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves if a is not None)

  @property
  def bits_per_param(self) -> float:
    return 8.0 * self.nbytes / self.size


def zeros_quantized(shape: tuple[int, ...], quant: QuantConfig = QuantConfig(),
                    dtype: str = "bfloat16") -> QuantizedArray:
  """The quantized all-zero tensor of a shape: the layout a checkpoint is then loaded into.

  Cheap under `nnx.eval_shape` (nothing is allocated); also a valid tensor (dequantizes to 0).
  """
  n = math.prod(shape)
  nb = -(-n // quant.blocksize)
  codebook = codebooks.CODEBOOKS[quant.quant_type]
  zero_code = int(np.flatnonzero(codebook == 0)[0])
  common = dict(codes=jnp.full(((n + 1) // 2,), zero_code * 17, jnp.uint8),
                quant_map=jnp.asarray(codebook), shape=tuple(shape), dtype=dtype,
                quant_type=quant.quant_type, blocksize=quant.blocksize)
  if not quant.double_quant:
    return QuantizedArray(absmax=jnp.zeros((nb,), jnp.float32), **common)
  nb2 = -(-nb // codebooks.NESTED_BLOCKSIZE)
  return QuantizedArray(absmax=jnp.zeros((nb,), jnp.uint8), nested_absmax=jnp.zeros((nb2,), jnp.float32),
                        nested_quant_map=jnp.asarray(codebooks.dynamic_map()),
                        offset=jnp.zeros((), jnp.float32), **common)


def _validate(w, quant_type: str, blocksize: int) -> None:
  """Raise ValueError naming what is wrong with a quantize() call."""
  QuantConfig(quant_type=quant_type, blocksize=blocksize)  # the one check of the settings
  if not hasattr(w, "dtype") or not hasattr(w, "shape"):
    raise ValueError(f"weight must be an array, got {type(w).__name__}")
  if jnp.dtype(w.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
    raise ValueError(f"weight dtype must be float32, bfloat16 or float16, got {w.dtype}")
  if len(w.shape) == 0 or math.prod(w.shape) == 0:
    raise ValueError(f"weight must have rank >= 1 and at least one element, got shape {w.shape}")
  if not isinstance(w, jax.core.Tracer) and not bool(jnp.isfinite(w).all()):
    bad = np.argwhere(~np.isfinite(np.asarray(w, np.float32)))
    raise ValueError(
        f"weight has {len(bad)} NaN/Inf value(s), first at index {tuple(bad[0].tolist())}: "
        "its block scales would be NaN; fix or drop the tensor before quantizing"
    )


def quantize(w, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> QuantizedArray:
  """Quantize a float tensor blockwise to 4 bits, as bitsandbytes' `quantize_4bit` does.

  Args:
    w: float32/bfloat16/float16 array of any rank >= 1 (a Linear weight is [out, in]).
    quant_type: "nf4", "fp4" or "int4" (symmetric absmax, codes (c - 8) / 7).
    blocksize: elements per scale: 32, 64, 128 or 256.
    double_quant: quantize the float32 absmax to 8 bits (bitsandbytes' compress_statistics).
  Returns:
    The QuantizedArray. Jittable when called inside jit (the NaN/Inf check needs concrete input).
  """
  _validate(w, quant_type, blocksize)
  return _quantize(jnp.asarray(w), quant_type, blocksize, double_quant)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w: jax.Array, quant_type: str, blocksize: int, double_quant: bool) -> QuantizedArray:
  x_N = w.reshape(-1).astype(jnp.float32)
  codes_N, absmax_B = _quantize_4bit(x_N, quant_type, blocksize)
  common = dict(shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, quant_type=quant_type,
                blocksize=blocksize)
  quant_map = jnp.asarray(codebooks.CODEBOOKS[quant_type])
  if not double_quant:
    return QuantizedArray(codes=codes_N, absmax=absmax_B, quant_map=quant_map, **common)
  offset = torch_cpu_mean(absmax_B)
  absmax_codes_B, nested_absmax = _quantize_dynamic(absmax_B - offset)
  return QuantizedArray(
      codes=codes_N, absmax=absmax_codes_B, quant_map=quant_map, nested_absmax=nested_absmax,
      nested_quant_map=jnp.asarray(codebooks.dynamic_map()), offset=offset, **common)


def _blocks(x_N: jax.Array, blocksize: int) -> jax.Array:
  """Zero-pad a flat array to whole blocks: [num_blocks, blocksize]."""
  nb = -(-x_N.shape[0] // blocksize)
  return jnp.pad(x_N, (0, nb * blocksize - x_N.shape[0])).reshape(nb, blocksize)


def _quantize_4bit(x_N: jax.Array, quant_type: str, blocksize: int) -> tuple[jax.Array, jax.Array]:
  """Packed codes uint8[(N+1)//2] and float32 absmax[num_blocks] of a flat float32 array."""
  n = x_N.shape[0]
  x_BxS = _blocks(x_N, blocksize)
  absmax_B = jnp.max(jnp.abs(x_BxS), axis=1)
  safe_B1 = jnp.where(absmax_B == 0, 1.0, absmax_B)[:, None]  # zero block: x == 0 anyway
  # bitsandbytes multiplies full blocks by the reciprocal but divides the partial last block
  # (the two round differently, and either can flip a code on a boundary).
  scaled = x_BxS * ieee.divide(1.0, safe_B1)
  if n % blocksize:
    scaled = scaled.at[-1].set(ieee.divide(x_BxS[-1], safe_B1[-1]))
  # An odd tail is paired with a scaled 0.0 (the codebook's zero code), as bitsandbytes pads.
  scaled_N = jnp.clip(scaled, -1.0, 1.0).reshape(-1)[: n + n % 2]
  bounds, order = codebooks.sorted_bounds(quant_type)
  # Rank = #{bounds < x}: 15 fused compares, never an [N, 16] tensor.
  rank_N = sum((scaled_N > b).astype(jnp.uint8) for b in bounds.tolist())
  codes_N = rank_N if quant_type == "nf4" else jnp.asarray(order)[rank_N]
  return _pack(codes_N), absmax_B


def _pack(codes_N: jax.Array) -> jax.Array:
  """Two 4-bit codes per byte (N even), even element in the high nibble."""
  pairs = codes_N.reshape(-1, 2)
  return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack(codes: jax.Array, n: int) -> jax.Array:
  """uint8 4-bit codes [n] from the packed bytes."""
  return jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)[:n]


def _quantize_dynamic(x_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """8-bit dynamic-map codes [N] and float32 absmax per 256-block, as bnb's CPU kernel."""
  n = x_N.shape[0]
  x_BxS = _blocks(x_N, codebooks.NESTED_BLOCKSIZE)
  absmax_B = jnp.max(jnp.abs(x_BxS), axis=1)
  inv_B1 = ieee.divide(1.0, jnp.where(absmax_B == 0, 1.0, absmax_B))[:, None]
  v_N = (x_BxS * inv_B1).reshape(-1)
  thresholds = jnp.asarray(codebooks.dynamic_thresholds())
  # Binary search for #{k >= 1 : thresholds[k] <= v}: 8 gathers from a 256-entry table.
  code = jnp.zeros(v_N.shape, jnp.int32)
  for step in (128, 64, 32, 16, 8, 4, 2, 1):
    code = jnp.where(thresholds[code + step] <= v_N, code + step, code)
  zero_block = jnp.repeat(absmax_B == 0, codebooks.NESTED_BLOCKSIZE)
  code = jnp.where(zero_block, 0, code)  # bnb writes code 0 for an all-zero block
  return code[:n].astype(jnp.uint8), absmax_B


def scales(qw: QuantizedArray) -> jax.Array:
  """float32 absmax per block, undoing double quantization when present."""
  if not qw.double_quant:
    return qw.absmax.astype(jnp.float32)
  nested = jnp.repeat(qw.nested_absmax, qw.nested_blocksize)[: qw.num_blocks]
  # Multiply, round, then add: bitsandbytes applies the offset as a separate operation.
  return ieee.rounded(qw.nested_quant_map[qw.absmax] * nested) + qw.offset


def dequantize(qw: QuantizedArray, dtype=jnp.bfloat16) -> jax.Array:
  """The tensor of qw's shape: quant_map[code] * absmax[block] in float32, then cast to dtype."""
  n = qw.size
  values_N = qw.quant_map[unpack(qw.codes, n)]
  values_BxS = _blocks(values_N, qw.blocksize)
  out = (values_BxS * scales(qw)[:, None]).reshape(-1)[:n]
  return out.reshape(qw.shape).astype(dtype)
