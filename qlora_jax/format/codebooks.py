"""The fixed code tables of the 4-bit and 8-bit formats, as float32 numpy constants.

Every table here reproduces bitsandbytes 0.50 bit for bit (the tests compare them against the
real library). They are plain numpy so that importing them costs nothing and they can be baked
into jitted code and Pallas kernels as constants.
"""

from __future__ import annotations

import functools

import numpy as np

QUANT_TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (32, 64, 128, 256)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double-quantizing the absmax

# NF4: quantiles of N(0, 1) normalised to [-1, 1], index order == value order.
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order; bit 3 is the sign.
FP4 = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
    / np.float32(12.0)
).astype(np.float32)

# INT4, symmetric absmax: code c means (c - 8) / 7, so codes 1..15 span -1..1 in steps of 1/7.
# Code 0 (-8/7) lies outside [-1, 1] and is never produced; it keeps the table 16 long.
INT4 = ((np.arange(16, dtype=np.float32) - np.float32(8)) / np.float32(7)).astype(np.float32)

CODEBOOKS = {"nf4": NF4, "fp4": FP4, "int4": INT4}


@functools.cache
def sorted_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
  """Midpoints between neighbouring codebook values, and the sorted-rank -> code permutation.

  A scaled value x takes rank r = #{bounds < x} (ties go to the lower code, as bitsandbytes'
  `torch.bucketize`), then code = order[r]. The stable sort matters for FP4's two zeros: +0
  (code 0) sorts before -0 (code 8), so tiny positive values get code 8, as in bitsandbytes.
  """
  code = CODEBOOKS[quant_type]
  order = np.argsort(code, kind="stable")
  srt = code[order]
  bounds = ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32)
  return bounds, order.astype(np.uint8)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """float32 linspace as torch computes it on CPU: the first half as start + step*i, the rest
  as end - step*(steps-1-i), each a fused multiply-add (one rounding, emulated in float64)."""
  step = np.float64(np.float32((end - start) / (steps - 1)))
  i = np.arange(steps, dtype=np.float64)
  lo = np.float64(np.float32(start)) + step * i
  hi = np.float64(np.float32(end)) - step * (steps - 1 - i)
  return np.where(i < steps // 2, lo, hi).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (max_exponent_bits=7): 256 sorted float32 values."""
  data: list[float] = []
  for i in range(7):
    bounds = _linspace_f32(0.1, 1.0, 2**i + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    scale = np.float32(10.0 ** (i - 6))
    data += (scale * means).astype(np.float32).tolist()
    data += (-scale * means).astype(np.float32).tolist()
  data += [0.0, 1.0]
  return np.sort(np.array(data, dtype=np.float32))


def _ordered_key(x: np.ndarray) -> np.ndarray:
  """Monotone map float32 -> uint32 (so bisection over keys is bisection over float32 values)."""
  bits = x.astype(np.float32).view(np.uint32)
  return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _from_key(k: np.ndarray) -> np.ndarray:
  k = k.astype(np.uint32)
  bits = np.where(k >> 31, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32)
  return bits.view(np.float32)


_LUT_SIZE = 65536


def _cpu_lut_code(v: np.ndarray, code: np.ndarray) -> np.ndarray:
  """bitsandbytes 0.50's CPU 8-bit code choice for normalised float32 values v.

  Its CPU kernel does not search the map exactly: it rounds v onto a 65536-bin grid over [-1, 1]
  and reads a table holding, per bin, the first code whose midpoint is not below the bin centre.
  """
  f32 = np.float32
  mids = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
  centres = (f32(-1.0) + (f32(2.0) * np.arange(_LUT_SIZE, dtype=f32)) / f32(_LUT_SIZE - 1)).astype(f32)
  lut = np.searchsorted(mids, centres, side="left")
  v = np.clip(v.astype(f32), f32(-1), f32(1))
  idx = ((((v + f32(1)) * f32(0.5)).astype(f32) * f32(_LUT_SIZE - 1)).astype(f32) + f32(0.5)).astype(f32)
  return lut[idx.astype(np.int64)]


@functools.cache
def dynamic_thresholds() -> np.ndarray:
  """float32[256]: t[k] = smallest v in [-1, 1] whose bnb-CPU code is >= k (t[0] = -inf).

  The bin-grid code choice is a monotone step function of v, so `code = #{k >= 1 : t[k] <= v}`
  reproduces it exactly with float32 comparisons only, on any backend (no rounding of an index
  computation that a compiler could contract into an FMA). Codes the grid never yields get
  t[k] = t[k+1] (or +inf past the top).
  """
  code = dynamic_map()
  lo = np.full(255, _ordered_key(np.float32(-1.0)), np.int64)
  hi = np.full(255, _ordered_key(np.float32(1.0)), np.int64)
  target = np.arange(1, 256)
  top = _cpu_lut_code(np.float32([1.0]), code)[0]
  # Invariant: code(lo) < k <= code(hi) for reachable k; bisect on the ordered keys.
  for _ in range(34):
    mid = (lo + hi) // 2
    ok = _cpu_lut_code(_from_key(mid), code) >= target
    hi = np.where(ok, mid, hi)
    lo = np.where(ok, lo, mid)
  t = _from_key(hi).astype(np.float32)
  t = np.where(target <= top, t, np.float32(np.inf))
  t = np.where(_cpu_lut_code(np.float32([-1.0]), code)[0] >= target, np.float32(-1.0), t)
  return np.concatenate([[np.float32(-np.inf)], t]).astype(np.float32)
