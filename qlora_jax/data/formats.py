"""Dataset formats: each row as consecutive (text, learned) parts, tokenized with the parts not
learned (the prompts) masked from the loss (labels IGNORE) unless trained on; and the columns each
format reads, checked before any model loads."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qlora_jax.data.conversations import CHAT_COLUMNS, CHAT_TURNS, assistant_turns, chat_parts, messages

IGNORE = -100
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes the "
                       "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
# format -> the columns it reads: each entry one required column, given by any of its names
COLUMNS = {"alpaca": (("instruction",), ("output",)), "oasst1": (("text",),), "text": (("text",),),
           "chat": (CHAT_COLUMNS,)}
FORMATS = tuple(COLUMNS)


def check_rows(rows, fmt: str, name: str = "dataset") -> None:
  """ValueError unless `rows` (a `datasets.Dataset` or a list of dicts) have the columns `fmt`
  reads, and, for chat, the first row is a conversation with an assistant turn.

  Cheap (column names and one row), so a trainer calls it before loading a model. `name` (the
  file or hub name) starts the message."""
  if fmt not in COLUMNS:
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")
  found = _column_names(rows)
  for names in COLUMNS[fmt]:
    if not set(names) & set(found):
      fits = [f for f, needs in COLUMNS.items() if all(set(n) & set(found) for n in needs)]
      fix = f"set dataset_format to {' or '.join(map(repr, fits))}" if fits else "rename the columns"
      raise ValueError(f"{name}: the {fmt!r} format needs a {' or '.join(map(repr, names))} column; "
                       f"columns found: {found}; {fix}")
  if fmt == "chat" and len(rows):
    try:
      assistant_turns(messages(rows[0]))
    except ValueError as e:
      raise ValueError(f"{name} example 1: {e}") from None


def _column_names(rows) -> list[str]:
  if hasattr(rows, "column_names"):
    return list(rows.column_names)
  return list(dict.fromkeys(k for row in rows for k in row))


def _field(row: dict, key: str, required: bool = True) -> str:
  """row[key] as text: a number as its str, None or NaN (an empty csv/parquet cell) as "" where
  the field is optional; a required field must be present."""
  value = row.get(key)
  if isinstance(value, float) and math.isnan(value):
    value = None
  if value is None:
    if required:
      present = sorted(k for k, v in row.items() if v is not None)
      raise ValueError(f"no {key!r} field (fields present: {present})")
    return ""
  if not isinstance(value, (str, int, float)):
    raise ValueError(f"the {key!r} field is a {type(value).__name__}, not text: {value!r:.80}")
  return str(value)


def text_parts(row: dict, fmt: str, tokenizer, *, chat_turns: str = "all") -> list[tuple[str, bool]]:
  """The row as consecutive (text, learned) parts: responses learned, prompts not.

  alpaca: the prompt (with an "### Input:" section when `input` is non-empty), then `output`;
  oasst1: bos, then all of `text` ("### Human: ... ### Assistant: ...") learned; text: all of
  `text` learned; chat: the conversation by the chat template, see `chat_parts`
  (`chat_turns` picks which assistant turns are learned). bos/eos are added where the format's
  text does not carry them."""
  bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
  if fmt == "alpaca":
    fields = {"instruction": _field(row, "instruction"), "input": _field(row, "input", required=False)}
    prompt = ALPACA_PROMPT_INPUT if fields["input"] else ALPACA_PROMPT
    return [(bos + prompt.format(**fields), False), (_field(row, "output") + eos, True)]
  if fmt == "oasst1":  # Guanaco: "### Human: ... ### Assistant: ..." trained as target only
    return [(bos, False), (_field(row, "text") + eos, True)]
  if fmt == "text":
    return [(_field(row, "text") + eos, True)]
  if fmt == "chat":
    return chat_parts(messages(row), tokenizer, chat_turns)
  raise ValueError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")


@dataclasses.dataclass
class Tokenized:
  """Inputs and next-token labels (already shifted: labels[t] is the token after inputs[t])."""

  inputs: list[np.ndarray]
  labels: list[np.ndarray]
  truncated: int  # examples cut to source_max_len / target_max_len

  def __len__(self) -> int:
    return len(self.inputs)


def tokenize(rows, fmt: str, tokenizer, source_max_len: int, target_max_len: int,
             train_on_source: bool, *, chat_turns: str = "all") -> Tokenized:
  """Tokenize every row (no special tokens added: the formats carry their own).

  Each prompt part keeps its last source_max_len tokens (the end, next to its response), each
  response its first target_max_len, and the whole example its first source_max_len +
  target_max_len tokens. A row that fails is named by its example number, counted from one.

  chat_turns (chat format only): "all" learns every assistant turn of a conversation, "last" only
  its last one; everything else (system, user, tool messages) is context, learned only with
  train_on_source."""
  if fmt not in COLUMNS:
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")
  if chat_turns not in CHAT_TURNS:
    raise ValueError(f"chat_turns must be one of {CHAT_TURNS}, got {chat_turns!r}")
  inputs, labels, truncated = [], [], 0
  for n, row in enumerate(rows, start=1):
    try:
      parts = text_parts(row, fmt, tokenizer, chat_turns=chat_turns)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"example {n} of the {fmt!r} data: {e}") from None
    ids, learned, cut = _encode(parts, tokenizer, source_max_len, target_max_len)
    truncated += cut
    lab = np.where(learned | train_on_source, ids, IGNORE).astype(np.int32)
    if len(ids) < 2 or np.all(lab[1:] == IGNORE):
      continue  # nothing to learn from
    inputs.append(ids[:-1])
    labels.append(lab[1:])
  if not inputs:
    raise ValueError(f"no usable {fmt!r} examples after tokenization: every response is empty or cut "
                     "away; check the data, or raise target_max_len / source_max_len")
  return Tokenized(inputs, labels, truncated)


def _encode(parts: list[tuple[str, bool]], tokenizer, source_max_len: int,
            target_max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """(token ids, learned mask, whether anything was cut) of the parts, cut as `tokenize` says."""
  ids, learned, cut = [], [], False
  for text, learn in parts:
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    limit = target_max_len if learn else source_max_len
    cut |= len(tokens) > limit
    tokens = tokens[:limit] if learn else tokens[max(0, len(tokens) - limit):]  # prompts keep their end
    ids += tokens
    learned += [learn] * len(tokens)
  total = source_max_len + target_max_len
  cut |= len(ids) > total
  return np.asarray(ids[:total], np.int32), np.asarray(learned[:total], bool), cut
