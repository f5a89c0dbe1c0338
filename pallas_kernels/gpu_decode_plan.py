"""The decode kernel's plan (gpu_decode): its configuration, how the work is dealt among the CTAs
(stream-K), the shared memory a configuration takes, and which products it covers.

Mosaic GPU refuses a kernel whose CTA asks for more shared memory than Hopper holds, so the
choice of pipeline depth and table layout for a size (and a LoRA update's rank) is made here from
an exact count of what the kernel allocates, not left to a compile error."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.gpu_widen import LANES, ROWS
from pallas_kernels.layout import BLOCK
from qlora_jax.format.codebooks import NESTED_BLOCKSIZE as NESTED
from qlora_jax.format.quantization import QuantizedArray

MAX_ROWS = 64  # rows of x (wgmma N); more rows are training shapes (gpu_matmul)


@dataclasses.dataclass(frozen=True)
class Config:
  """Activation rows per CTA (wgmma N: x is padded to it), compute warpgroups per CTA, pipeline
  depth, blocks a step, the table's layout, who waits for the tables, dependent launch."""

  cols: int = 16
  compute_wgs: int = 2
  stages: int = 3  # pipeline depth: the best measured on H100 (docs/kernels.md)
  blocks: int = 4  # quantization blocks a step: a code row of 32 * blocks bytes per TMA row
  wide_table: bool = True  # gpu_widen.pair_table(wide=True): one byte permute per lookup address
  # only the compute warpgroups wait for the tables (pair table, qmap, h) before their first step,
  # so the memory warpgroup's first code copies fly with the tables' (docs/kernels.md)
  tables_under_pipeline: bool = True
  # programmatic dependent launch: the kernel may start while the kernels before it finish; its
  # threads wait for them (griddepcontrol.wait) once the pair table's copy (a constant) is
  # issued, before any operand an earlier kernel may write or the output it may read is
  # touched, and it lets the kernels after it launch once its pipeline is done (compiled only)
  pdl: bool = False


@dataclasses.dataclass(frozen=True)
class Split:
  """How the work is dealt (stream-K): the (row tile, step of K) pairs in row-major order, `per_cta`
  consecutive ones to each of `ctas` CTAs (the last CTA's share may run past the end: those steps
  repeat the last pair's copies and are never stored). A CTA's accumulator runs on across the row
  tiles it touches; after each one's last step it is stored, cumulative, as segment tile -
  first_tile(cta) of that CTA, so a tile's part is the difference of consecutive segments (float32:
  off by ~2^-24 of the running sum), and a tile split between CTAs is the sum of their parts
  (`combine`)."""

  ctas: int
  per_cta: int
  tile_steps: int  # steps of K per row tile
  tiles: int

  @property
  def total(self) -> int:
    return self.tiles * self.tile_steps

  def first_tile(self, cta):
    return cta * self.per_cta // self.tile_steps

  def last_tile(self, cta):
    return (np.minimum((cta + 1) * self.per_cta, self.total) - 1) // self.tile_steps

  def first_cta(self, tile):
    return tile * self.tile_steps // self.per_cta

  def last_cta(self, tile):
    return ((tile + 1) * self.tile_steps - 1) // self.per_cta

  @property
  def segments(self) -> int:  # row tiles a CTA touches, at most
    c = np.arange(self.ctas)
    return int(np.max(self.last_tile(c) - self.first_tile(c))) + 1

  def combine(self, stored):
    """[tiles, ...] from the kernel's stored segments [ctas, segments, ...] (those a CTA did not
    reach are unwritten: never read). A sum of a few gathered slices, not a reduction, so that
    XLA can fuse it into the product's consumer instead of launching a reduction kernel of its
    own."""
    parts = stored - jnp.concatenate([jnp.zeros_like(stored[:, :1]), stored[:, :-1]], 1)
    t = np.arange(self.tiles)
    first, last = self.first_cta(t), self.last_cta(t)
    total = None
    for slot in range(int(np.max(last - first)) + 1):  # the slot-th CTA of each tile, if any
      cta = np.minimum(first + slot, last)
      part = parts[cta, t - self.first_tile(cta)]  # [tiles, ...]
      if slot:
        real = (first + slot <= last).reshape((-1,) + (1,) * (part.ndim - 1))
        part = jnp.where(real, part, 0)
      total = part if total is None else total + part
    return total


@dataclasses.dataclass(frozen=True)
class Part:
  """One weight of a group sharing x in one launch (gpu_decode.decode_group): its Split over its
  own CTAs, the first of them in the launch's grid, and its first stored segment."""

  split: Split
  first_cta: int
  first_segment: int


def parts_for(ns: tuple[int, ...], k: int, config: Config, ctas: int) -> tuple[Part, ...]:
  """Weights [N_i, K] dealt among at most `ctas` CTAs (one a weight at least): the fewest steps a
  CTA that lets every weight's (row tile, step of K) pairs fit, each weight as few CTAs as take
  its pairs in shares of that many."""
  tile_steps = k // (BLOCK * config.blocks)
  totals = [n // (config.compute_wgs * ROWS) * tile_steps for n in ns]
  per_cta = next(p for p in range(-(-sum(totals) // ctas), max(totals) + 1)
                 if sum(-(-t // p) for t in totals) <= ctas or p == max(totals))
  parts, cta, segment = [], 0, 0
  for n, total in zip(ns, totals):
    split = Split(ctas=-(-total // per_cta), per_cta=per_cta, tile_steps=tile_steps,
                  tiles=total // tile_steps)
    parts.append(Part(split, cta, segment))
    cta, segment = cta + split.ctas, segment + split.ctas * split.segments
  return tuple(parts)


def split_for(n: int, k: int, config: Config, ctas: int) -> Split:
  """One weight's split (a group of one): the fewest steps a CTA (at most `ctas` CTAs, one per
  SM), then as few CTAs as take them all."""
  return parts_for((n,), k, config, ctas)[0].split


SMEM_LIMIT = 232448  # bytes of shared memory a CTA may hold on Hopper (227 KB)


def out_columns(m: int) -> int:
  """Columns of the stored accumulators for x [m, K]: m in whole 8s."""
  return -(-m // 8) * 8


def smem_bytes(config: Config, m: int, lora_rank: int = 0, double_quant: bool = True,
               norm_k: int = 0) -> int:
  """The shared memory _call allocates for x [m, K] (Mosaic GPU refuses a kernel over
  SMEM_LIMIT): the pair table, qmap, the accumulator stores, a LoRA update's h and b tiles, the
  norm's input (norm_k: its K, 0: none), and `stages` pipeline buffers of x's tile and the code
  tile (and their barriers)."""
  step_k, lanes = BLOCK * config.blocks, 2 * LANES if config.wide_table else LANES
  fixed = 256 * lanes * 4 + (256 * 4 if double_quant else 0) + 16
  fixed += config.compute_wgs * ROWS * out_columns(m) * 4  # out_smem
  if lora_rank:
    r = -(-lora_rank // BLOCK) * BLOCK
    fixed += config.cols * r * 2 + config.compute_wgs * r * ROWS * 2 + 8 * (1 + config.compute_wgs)
  fixed += norm_k * 2 + (8 if norm_k else 0)
  per_stage = config.cols * step_k * 2 + config.compute_wgs * ROWS * step_k // 2 + 16
  return fixed + config.stages * per_stage


def config_for(m: int, k: int, lora_rank: int = 0) -> Config:
  """x padded to 16, 32 or 64 rows; as many blocks a step as K allows; the deepest pipeline (up
  to Config.stages, at least 2) that fits in shared memory beside a LoRA update's tiles, with the
  wide table for x's 16- and 32-row tiles and the narrow one for its 64-row tiles (the measured
  defaults), the other table only where that one does not fit (x [64, K] with a rank-64 update:
  the narrow table, two steps in flight)."""
  cols = 16 if m <= 16 else 32 if m <= 32 else MAX_ROWS
  blocks = next(b for b in (4, 2, 1) if k % (BLOCK * b) == 0)
  tables = (True, False) if cols < MAX_ROWS else (False, True)
  candidates = [Config(cols=cols, blocks=blocks, wide_table=wide, stages=stages)
                for stages in range(Config.stages, 1, -1) for wide in tables]
  return next((c for c in candidates if smem_bytes(c, m, lora_rank) <= SMEM_LIMIT), candidates[-1])


def unsupported_reason(m: int, qw: QuantizedArray, lora_rank: int = 0) -> str | None:
  """Why decode cannot take x [m, K] @ qw^T (+ a LoRA update of lora_rank; None if it can)."""
  if len(qw.shape) != 2:
    return f"weight of rank {len(qw.shape)} (decode takes [N, K])"
  n, k = qw.shape
  if m > MAX_ROWS or n % (Config.compute_wgs * ROWS) or k % BLOCK:
    return (f"decode takes at most {MAX_ROWS} rows, N divisible by {Config.compute_wgs * ROWS} "
            f"and K by {BLOCK}; got x [{m}, {k}], W [{n}, {k}]")
  if qw.blocksize != BLOCK or (qw.double_quant and qw.nested_blocksize != NESTED):
    return (f"decode takes blocks of {BLOCK} (nested blocks of {NESTED}); got "
            f"{qw.blocksize} ({qw.nested_blocksize})")
  need = smem_bytes(config_for(m, k, lora_rank), m, lora_rank, qw.double_quant)
  if need > SMEM_LIMIT:
    return (f"x [{m}, {k}] with a LoRA update of rank {lora_rank} needs {need} bytes of shared "
            f"memory (a CTA holds at most {SMEM_LIMIT})")
  return None
