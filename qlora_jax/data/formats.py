"""Dataset formats: each row as (prompt, response) text, tokenized with the prompt masked from
the loss (labels IGNORE) unless trained on."""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -100
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes the "
                       "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")


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
