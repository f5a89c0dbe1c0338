"""python -m qlora_jax.evaluate MODEL [--adapter RUN_OR_PEFT_DIR] (--mmlu DIR | --data FILE)

Evaluate a converted model, with or without an adapter:
  --mmlu DIR   multiple-choice accuracy in the MMLU layout (DIR/dev/<subject>_dev.csv and
               DIR/test/<subject>_test.csv, rows: question, A, B, C, D, answer letter, no
               header): a k-shot prompt from the subject's dev rows, and the answer letter the
               model finds most likely after "Answer:", as qlora.py's MMLU evaluation scores it.
  --data FILE  mean token loss and perplexity on a held-out file of the training formats.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  choices: tuple[str, str, str, str]
  answer: str  # one of LETTERS


def read_subject(path: pathlib.Path) -> list[Question]:
  """The questions of one MMLU csv file; ValueError naming the file and row of a bad one."""
  out = []
  with open(path, newline="", encoding="utf-8") as f:
    for n, row in enumerate(csv.reader(f), start=1):
      if len(row) != 6 or row[5].strip() not in LETTERS:
        raise ValueError(f"{path} row {n}: expected question, A, B, C, D, answer letter "
                         f"(A-D); got {len(row)} fields")
      out.append(Question(row[0], tuple(row[1:5]), row[5].strip()))
  return out


def read_mmlu(folder) -> dict[str, tuple[list[Question], list[Question]]]:
  """{subject: (dev questions, test questions)} from an MMLU-layout folder."""
  folder = pathlib.Path(folder)
  tests = sorted((folder / "test").glob("*_test.csv"))
  if not tests:
    raise ValueError(f"{folder}: no test/<subject>_test.csv files; expected the MMLU layout "
                     "(dev/<subject>_dev.csv and test/<subject>_test.csv)")
  subjects = {}
  for test in tests:
    subject = test.name[: -len("_test.csv")]
    dev = folder / "dev" / f"{subject}_dev.csv"
    subjects[subject] = (read_subject(dev) if dev.is_file() else [], read_subject(test))
  return subjects


def format_question(q: Question, with_answer: bool) -> str:
  lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
  return "\n".join(lines) + "\nAnswer:" + (f" {q.answer}\n\n" if with_answer else "")


def prompt(subject: str, shots: list[Question], q: Question) -> str:
  """The k-shot prompt (the original MMLU evaluation's wording) ending in "Answer:"."""
  head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
  return head + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def letter_logprobs(model, tokenizer, text: str) -> np.ndarray:
  """float64 [4]: the log-likelihood of " A" .. " D" after text, each continuation's tokens (what
  the text's own tokens are extended or changed by) scored in full, the four in one batch."""
  base = tokenizer(text, add_special_tokens=False)["input_ids"]
  rows, starts = [], []
  for letter in LETTERS:
    full = tokenizer(text + " " + letter, add_special_tokens=False)["input_ids"]
    same = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
    rows.append(full)
    starts.append(max(min(same, len(full) - 1), 1))
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  logp = np.asarray(jax.nn.log_softmax(_logits(model, jnp.asarray(ids), jnp.asarray(mask)), axis=-1),
                    np.float64)
  return np.asarray([sum(logp[i, j - 1, r[j]] for j in range(start, len(r)))
                     for i, (r, start) in enumerate(zip(rows, starts))])


@nnx.jit
def _logits(model, ids, mask):
  return model(ids, attention_mask=mask).astype(jnp.float32)


def mmlu(model, tokenizer, folder, shots: int = 5) -> dict[str, float]:
  """{subject: accuracy} and "average" (over all questions) on an MMLU-layout folder."""
  correct, total, scores = 0, 0, {}
  for subject, (dev, test) in read_mmlu(folder).items():
    hits = 0
    for q in test:
      best = int(np.argmax(letter_logprobs(model, tokenizer, prompt(subject, dev[:shots], q))))
      hits += LETTERS[best] == q.answer
    scores[subject] = hits / len(test)
    correct, total = correct + hits, total + len(test)
  scores["average"] = correct / total
  return scores


def perplexity(model, tokenizer, dataset: str, dataset_format: str, max_len: int) -> tuple[float, float]:
  """(mean token loss, perplexity) of a data file's target tokens, as training counts them."""
  from qlora_jax import data as data_lib
  from qlora_jax.train.loss import batch_loss

  rows = data_lib.load_rows(dataset)
  data_lib.check_rows(rows, dataset_format, dataset)
  tokenized = data_lib.tokenize(rows, dataset_format, tokenizer, max_len // 2, max_len - max_len // 2, False)
  step = nnx.jit(batch_loss)
  total = count = 0.0
  for batch in data_lib.eval_batches(tokenized, 8, max_len):
    t, c = step(model, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = total + float(t), count + float(c)
  loss = total / max(count, 1.0)
  return loss, math.exp(loss)


def main(argv=None) -> int:
  from qlora_jax.cli import run

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="a folder written by convert_weights.py")
  p.add_argument("--adapter", help="a training run folder or a PEFT adapter folder")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--mmlu", help="a folder in the MMLU layout (dev/, test/)")
  what.add_argument("--data", help="a held-out data file (json/jsonl/csv/parquet)")
  p.add_argument("--shots", type=int, default=5)
  p.add_argument("--format", default="alpaca", help="--data's format: alpaca | oasst1 | chat | text")
  p.add_argument("--max-len", type=int, default=1024)
  args = p.parse_args(argv)

  def evaluate() -> str:
    if args.adapter:
      from qlora_jax.export import load_adapter
      model, tokenizer = load_adapter(args.model, args.adapter)
    else:
      from qlora_jax.io.loading import load_model
      model, tokenizer = load_model(args.model)
    model.eval()
    if args.mmlu:
      scores = mmlu(model, tokenizer, args.mmlu, args.shots)
      return "\n".join(f"{k:40} {v:.4f}" for k, v in scores.items())
    loss, ppl = perplexity(model, tokenizer, args.data, args.format, args.max_len)
    return f"eval loss {loss:.4f}, perplexity {ppl:.3f}"

  return run(evaluate)


if __name__ == "__main__":
  sys.exit(main())
