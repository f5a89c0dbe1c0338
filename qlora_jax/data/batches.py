"""Batches: examples padded to length buckets, or packed several to a row with per-segment
positions, in a resumable order."""

from __future__ import annotations

import numpy as np

from qlora_jax.data.formats import IGNORE, Tokenized

PAD_MULTIPLE = 64  # unpacked batches are padded to a multiple of this: few distinct shapes


def _empty_batch(rows: int, length: int, segments: bool) -> dict[str, np.ndarray]:
  batch = {"input_ids": np.zeros((rows, length), np.int32),
           "labels": np.full((rows, length), IGNORE, np.int32),
           "positions": np.zeros((rows, length), np.int32)}
  if segments:
    batch["segment_ids"] = np.zeros((rows, length), np.int32)
  return batch


def padded_batch(data: Tokenized, idx: list[int], batch_size: int, max_len: int) -> dict[str, np.ndarray]:
  """One example per row from its first column, padded at the end to a multiple of PAD_MULTIPLE.

  No segment ids: causal attention alone keeps every real token from the padding after it (whose
  labels are IGNORE), so the model takes its causal path and no [T, T] mask is ever built."""
  longest = max(len(data.inputs[i]) for i in idx)
  length = min(max_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
  batch = _empty_batch(batch_size, length, segments=False)
  for row, i in enumerate(idx):
    n = len(data.inputs[i])
    batch["input_ids"][row, :n] = data.inputs[i]
    batch["labels"][row, :n] = data.labels[i]
    batch["positions"][row, :n] = np.arange(n)
  return batch


def pack(data: Tokenized, order: list[int], length: int) -> list[list[int]]:
  """Greedy packing in order: each row holds consecutive examples fitting `length` tokens."""
  rows, current, used = [], [], 0
  for i in order:
    n = len(data.inputs[i])
    if current and used + n > length:
      rows.append(current)
      current, used = [], 0
    current.append(i)
    used += n
  if current:
    rows.append(current)
  return rows


def packed_batch(data: Tokenized, rows: list[list[int]], batch_size: int, length: int) -> dict[str, np.ndarray]:
  """Several examples per row: segment ids 1, 2, ... keep attention inside each example."""
  batch = _empty_batch(batch_size, length, segments=True)
  for r, members in enumerate(rows):
    start = 0
    for seg, i in enumerate(members, start=1):
      n = len(data.inputs[i])
      batch["input_ids"][r, start:start + n] = data.inputs[i]
      batch["labels"][r, start:start + n] = data.labels[i]
      batch["positions"][r, start:start + n] = np.arange(n)
      batch["segment_ids"][r, start:start + n] = seg
      start += n
  return batch


class Batches:
  """The training stream: epochs of shuffled batches; its position is (epoch, index).

  Each epoch's order depends only on (seed, epoch), so restoring the position resumes the exact
  same stream. With group_by_length, mega-batches of 50 batches are sorted by length (fewer pad
  tokens), then the batch order is shuffled.
  """

  def __init__(self, data: Tokenized, batch_size: int, max_len: int, *, seed: int,
               packing: bool, group_by_length: bool):
    self.data, self.batch_size, self.max_len = data, batch_size, max_len
    self.seed, self.packing, self.group_by_length = seed, packing, group_by_length
    self.epoch, self.index = 0, 0
    self._plan = self._epoch_plan(0)

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._plan = self._epoch_plan(self.epoch)

  def _epoch_plan(self, epoch: int) -> list[list]:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.data)).tolist()
    if self.packing:
      rows = pack(self.data, order, self.max_len)
      return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
    if self.group_by_length:
      mega = self.batch_size * 50
      order = [i for s in range(0, len(order), mega)
               for i in sorted(order[s:s + mega], key=lambda i: -len(self.data.inputs[i]))]
    plan = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    return [plan[i] for i in rng.permutation(len(plan))] if self.group_by_length else plan

  def next(self) -> dict[str, np.ndarray]:
    if self.index >= len(self._plan):
      self.epoch, self.index = self.epoch + 1, 0
      self._plan = self._epoch_plan(self.epoch)
    item = self._plan[self.index]
    self.index += 1
    if self.packing:
      return packed_batch(self.data, item, self.batch_size, self.max_len)
    return padded_batch(self.data, item, self.batch_size, self.max_len)

  def next_accumulated(self, steps: int) -> dict[str, np.ndarray]:
    """`steps` micro-batches stacked [steps, B, T] (padded to a common length)."""
    micro = [self.next() for _ in range(steps)]
    length = max(m["input_ids"].shape[1] for m in micro)
    return {k: np.stack([_pad_to(m[k], length, IGNORE if k == "labels" else 0) for m in micro])
            for k in micro[0]}


def _pad_to(a: np.ndarray, length: int, value: int) -> np.ndarray:
  return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=value)


def eval_batches(data: Tokenized, batch_size: int, max_len: int) -> list[dict[str, np.ndarray]]:
  """The whole evaluation set, in order, one example per row."""
  idx = list(range(len(data)))
  return [padded_batch(data, idx[i:i + batch_size], batch_size, max_len)
          for i in range(0, len(idx), batch_size)]
