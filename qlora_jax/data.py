"""Instruction data: load with HF `datasets`, format, tokenize with masked prompts, then batch
(padded to length buckets, or packed with per-segment positions) in a resumable order."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

IGNORE = -100
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes the "
                       "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PAD_MULTIPLE = 64  # unpacked batches are padded to a multiple of this: few distinct shapes


def load_rows(spec: str):
  """A `datasets.Dataset` from a local json/jsonl/parquet/csv file or a hub dataset name."""
  import datasets

  path = pathlib.Path(spec)
  if path.suffix in FILE_BUILDERS or path.exists():
    if not path.is_file():
      raise ValueError(f"dataset file {spec} does not exist" if not path.exists()
                       else f"dataset {spec} is a folder; give a json/jsonl/parquet/csv file")
    if path.suffix not in FILE_BUILDERS:
      raise ValueError(f"dataset file {spec}: unsupported type; use {sorted(FILE_BUILDERS)}")
    try:
      rows = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as e:
      raise ValueError(f"cannot read dataset {spec}: {type(e).__name__}: {e}") from e
  elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
    try:
      rows = datasets.load_dataset(spec, split="train")
    except Exception as e:
      raise ValueError(f"cannot load dataset {spec!r} from the hub ({type(e).__name__}); "
                       "download it where the network allows and pass a local file") from e
  else:
    raise ValueError(f"dataset {spec!r} is neither an existing file nor a hub name")
  if len(rows) == 0:
    raise ValueError(f"dataset {spec} is empty")
  return rows


def source_and_target(row: dict, fmt: str, tokenizer) -> tuple[str, str]:
  """The prompt (no loss unless train_on_source) and the response of one row."""
  try:
    if fmt == "alpaca":
      prompt = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
      return (tokenizer.bos_token or "") + prompt.format(**row), row["output"] + (tokenizer.eos_token or "")
    if fmt == "oasst1":  # Guanaco: "### Human: ... ### Assistant: ..." trained as target only
      return tokenizer.bos_token or "", row["text"] + (tokenizer.eos_token or "")
    if fmt == "text":
      return "", row["text"] + (tokenizer.eos_token or "")
    if fmt == "chat":
      messages = row["messages"]
      if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"a chat example must end with an assistant message, got {messages!r:.200}")
      source = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
      full = tokenizer.apply_chat_template(messages, tokenize=False)
      if not full.startswith(source):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
      return source, full[len(source):]
  except (KeyError, TypeError) as e:  # a missing field, or a null one
    raise ValueError(f"a {fmt!r} example lacks or mistypes a field ({type(e).__name__}: {e}); "
                     f"fields present: {sorted(row)}") from e
  raise ValueError(f"unknown dataset format {fmt!r}")


@dataclasses.dataclass
class Tokenized:
  """Inputs and next-token labels (already shifted: labels[t] is the token after inputs[t])."""

  inputs: list[np.ndarray]
  labels: list[np.ndarray]
  truncated: int  # examples cut to source_max_len / target_max_len

  def __len__(self) -> int:
    return len(self.inputs)


def tokenize(rows, fmt: str, tokenizer, source_max_len: int, target_max_len: int,
             train_on_source: bool) -> Tokenized:
  """Tokenize every row (no special tokens added: the formats carry their own)."""
  inputs, labels, truncated = [], [], 0
  for row in rows:
    source, target = source_and_target(row, fmt, tokenizer)
    src = tokenizer(source, add_special_tokens=False)["input_ids"] if source else []
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(src) > source_max_len or len(tgt) > target_max_len:
      truncated += 1
    src = src[-source_max_len:]  # keep the end of the prompt, next to the response
    tgt = tgt[:target_max_len]
    ids = np.asarray(src + tgt, np.int32)
    lab = np.asarray((src if train_on_source else [IGNORE] * len(src)) + tgt, np.int32)
    if len(ids) < 2 or np.all(lab[1:] == IGNORE):
      continue  # nothing to learn from
    inputs.append(ids[:-1])
    labels.append(lab[1:])
  if not inputs:
    raise ValueError("no usable examples after tokenization (empty responses?)")
  return Tokenized(inputs, labels, truncated)


def _empty_batch(rows: int, length: int) -> dict[str, np.ndarray]:
  return {"input_ids": np.zeros((rows, length), np.int32),
          "labels": np.full((rows, length), IGNORE, np.int32),
          "positions": np.zeros((rows, length), np.int32),
          "segment_ids": np.zeros((rows, length), np.int32)}


def padded_batch(data: Tokenized, idx: list[int], batch_size: int, max_len: int) -> dict[str, np.ndarray]:
  """One example per row, padded to a multiple of PAD_MULTIPLE (padding rows: segment 0)."""
  longest = max(len(data.inputs[i]) for i in idx)
  length = min(max_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
  batch = _empty_batch(batch_size, length)
  for row, i in enumerate(idx):
    n = len(data.inputs[i])
    batch["input_ids"][row, :n] = data.inputs[i]
    batch["labels"][row, :n] = data.labels[i]
    batch["positions"][row, :n] = np.arange(n)
    batch["segment_ids"][row, :n] = 1
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
  batch = _empty_batch(batch_size, length)
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
