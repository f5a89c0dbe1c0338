"""Data: formats, prompt masking, truncation, packing, deterministic resumable order."""

import json

import numpy as np
import pytest

from qlora_jax import data as D


class CharTokenizer:
  """A tokenizer with one id per character (ids 3..), bos=1, eos=2: lengths are predictable."""

  bos_token, eos_token, eos_token_id = "\x01", "\x02", 2

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [1 if c == "\x01" else 2 if c == "\x02" else 3 + (ord(c) % 500) for c in text]}

  def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
    text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


TOK = CharTokenizer()


def _write(tmp_path, rows, name="d.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_alpaca_prompt_is_masked_and_response_learned(tmp_path):
  rows = D.load_rows(_write(tmp_path, [{"instruction": "Add 2 and 2.", "input": "", "output": "4"}]))
  t = D.tokenize(rows, "alpaca", TOK, 1024, 256, train_on_source=False)
  source, target = D.source_and_target(rows[0], "alpaca", TOK)
  assert source.startswith("\x01Below is an instruction") and source.endswith("### Response: ")
  assert target == "4\x02"
  labels = t.labels[0]
  # Shifted labels: the last len(target) positions predict the response tokens, the rest are masked.
  assert (labels[-2:] == TOK(target)["input_ids"]).all() and (labels[:-2] == D.IGNORE).all()
  assert (t.inputs[0] == TOK(source + target)["input_ids"][:-1]).all()


def test_train_on_source_keeps_the_prompt_labels(tmp_path):
  rows = D.load_rows(_write(tmp_path, [{"instruction": "Hi", "input": "x", "output": "yo"}]))
  t = D.tokenize(rows, "alpaca", TOK, 1024, 256, train_on_source=True)
  assert (t.labels[0] != D.IGNORE).all()
  assert "### Input:\nx" in D.source_and_target(rows[0], "alpaca", TOK)[0]


@pytest.mark.parametrize("fmt, row", [
    ("oasst1", {"text": "### Human: hi### Assistant: hello"}),
    ("text", {"text": "plain text"}),
])
def test_target_only_formats(tmp_path, fmt, row):
  t = D.tokenize(D.load_rows(_write(tmp_path, [row])), fmt, TOK, 1024, 256, False)
  # oasst1 starts with bos, so every text token is predicted; plain text cannot predict its first.
  expected = len(row["text"]) + 1 - (fmt == "text")
  assert t.labels[0][-1] == 2 and (t.labels[0] != D.IGNORE).sum() == expected


def test_chat_format_learns_only_the_last_reply(tmp_path):
  row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]}
  t = D.tokenize(D.load_rows(_write(tmp_path, [row])), "chat", TOK, 1024, 256, False)
  learned = [i for i in t.labels[0] if i != D.IGNORE]
  assert learned == TOK("ans</>")["input_ids"]


def test_truncation_is_counted_and_keeps_the_prompt_end(tmp_path):
  rows = D.load_rows(_write(tmp_path, [{"text": "abcdefghij"}, {"text": "ab"}]))
  t = D.tokenize(rows, "text", TOK, 1024, 5, False)
  assert t.truncated == 1 and len(t.labels[0]) == 4


def test_missing_field_and_bad_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="lacks or mistypes a field.*'output'"):
    D.tokenize(D.load_rows(_write(tmp_path, [{"instruction": "x"}])), "alpaca", TOK, 64, 64, False)
  with pytest.raises(ValueError, match="does not exist"):
    D.load_rows(str(tmp_path / "missing.jsonl"))
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match="empty|cannot read"):
    D.load_rows(str(tmp_path / "empty.jsonl"))
  (tmp_path / "x.txt").write_text("hello")
  with pytest.raises(ValueError, match="unsupported type"):
    D.load_rows(str(tmp_path / "x.txt"))


def test_csv_and_parquet_load(tmp_path):
  import datasets

  ds = datasets.Dataset.from_list([{"text": "a b"}, {"text": "c"}])
  ds.to_csv(str(tmp_path / "d.csv"))
  ds.to_parquet(str(tmp_path / "d.parquet"))
  assert len(D.load_rows(str(tmp_path / "d.csv"))) == len(D.load_rows(str(tmp_path / "d.parquet"))) == 2


def _data(n=40, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(3, 30, n)
  return D.Tokenized([np.arange(k, dtype=np.int32) + 3 for k in lens],
                     [np.arange(k, dtype=np.int32) + 4 for k in lens], 0)


def test_packing_keeps_segments_apart_and_positions_restart():
  data = _data()
  b = D.Batches(data, 4, 64, seed=0, packing=True, group_by_length=False).next()
  assert b["input_ids"].shape == (4, 64)
  for row in range(4):
    seg, pos = b["segment_ids"][row], b["positions"][row]
    for s in set(seg[seg > 0].tolist()):
      assert (pos[seg == s] == np.arange((seg == s).sum())).all()
    assert (b["labels"][row][seg == 0] == D.IGNORE).all()


def test_order_is_deterministic_and_resumable():
  data = _data()
  a = D.Batches(data, 4, 64, seed=1, packing=False, group_by_length=True)
  first = [a.next() for _ in range(15)]  # crosses an epoch boundary (10 batches per epoch)
  b = D.Batches(data, 4, 64, seed=1, packing=False, group_by_length=True)
  for _ in range(7):
    b.next()
  c = D.Batches(data, 4, 64, seed=1, packing=False, group_by_length=True)
  c.restore(b.state())
  for expected in first[7:]:
    got = c.next()
    assert all((got[k] == expected[k]).all() for k in expected)
  other = D.Batches(data, 4, 64, seed=2, packing=False, group_by_length=True).next()
  assert not all((other[k].shape == first[0][k].shape and (other[k] == first[0][k]).all()) for k in other)


def test_padded_batches_use_few_shapes():
  data = _data()
  batches = D.Batches(data, 4, 256, seed=0, packing=False, group_by_length=True)
  shapes = {batches.next()["input_ids"].shape for _ in range(10)}
  assert all(s[1] % D.PAD_MULTIPLE == 0 for s in shapes) and len(shapes) <= 2
