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
  (source, _), (target, _) = D.text_parts(rows[0], "alpaca", TOK)
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
  assert "### Input:\nx" in D.text_parts(rows[0], "alpaca", TOK)[0][0]


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
  with pytest.raises(ValueError, match="example 1 of the 'alpaca' data: no 'output' field"):
    D.tokenize(D.load_rows(_write(tmp_path, [{"instruction": "x"}])), "alpaca", TOK, 64, 64, False)
  with pytest.raises(ValueError, match="does not exist"):
    D.load_rows(str(tmp_path / "missing.jsonl"))
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match="no examples"):
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



def _learned(t, i=0):
  return [int(x) for x in t.labels[i] if x != D.IGNORE]


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]


def test_chat_learns_every_assistant_turn_or_only_the_last(tmp_path):
  rows = D.load_rows(_write(tmp_path, [{"messages": CONVERSATION}]))
  every = D.tokenize(rows, "chat", TOK, 1024, 256, False)
  assert _learned(every) == TOK("a1</>a2</>")["input_ids"]
  # The inputs are the whole conversation as the template renders it, unchanged by the masking.
  assert (every.inputs[0] == TOK(TOK.apply_chat_template(CONVERSATION))["input_ids"][:-1]).all()
  last = D.tokenize(rows, "chat", TOK, 1024, 256, False, chat_turns="last")
  assert _learned(last) == TOK("a2</>")["input_ids"]
  assert (last.inputs[0] == every.inputs[0]).all()
  with pytest.raises(ValueError, match="chat_turns must be one of"):
    D.tokenize(rows, "chat", TOK, 1024, 256, False, chat_turns="first")


def test_chat_messages_after_the_last_reply_are_dropped_and_long_chats_cut(tmp_path):
  rows = D.load_rows(_write(tmp_path, [{"messages": CONVERSATION + [{"role": "user", "content": "q3"}]}]))
  t = D.tokenize(rows, "chat", TOK, 1024, 256, False)
  assert len(t.inputs[0]) + 1 == len(TOK.apply_chat_template(CONVERSATION))
  cut = D.tokenize(rows, "chat", TOK, 20, 10, False)  # prompts keep their last 20 tokens, the whole its first 30
  assert cut.truncated == 1 and len(cut.inputs[0]) == 29 and _learned(cut) == TOK("a1</>")["input_ids"]


def test_sharegpt_conversations_train_like_chat_messages(tmp_path):
  speakers = {"system": "system", "user": "human", "assistant": "gpt"}
  row = {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in CONVERSATION]}
  sharegpt = D.tokenize(D.load_rows(_write(tmp_path, [row], "s.jsonl")), "chat", TOK, 1024, 256, False)
  chat = D.tokenize(D.load_rows(_write(tmp_path, [{"messages": CONVERSATION}])), "chat", TOK, 1024, 256, False)
  assert (sharegpt.inputs[0] == chat.inputs[0]).all() and (sharegpt.labels[0] == chat.labels[0]).all()
  bad = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
  with pytest.raises(ValueError, match="example 1 .*unknown ShareGPT speaker 'narrator'"):
    D.tokenize([bad], "chat", TOK, 1024, 256, False)


def test_alpaca_numbers_and_empty_cells_become_text(tmp_path):
  path = tmp_path / "a.csv"
  path.write_text("instruction,input,output\nAdd 2 and 2.,,4\nDouble it.,21,42\nPad.,007,7.5\n")
  rows = D.load_rows(str(path))
  parts = [D.text_parts(r, "alpaca", TOK) for r in rows]
  assert "### Input:" not in parts[0][0][0] and parts[0][1][0] == "4\x02"
  assert "### Input:\n21\n" in parts[1][0][0] and parts[1][1][0] == "42\x02"
  assert "### Input:\n007\n" in parts[2][0][0] and parts[2][1][0] == "7.5\x02"
  # Numeric cells as pandas or parquet give them (NaN for an empty one) are text too.
  (prompt, _), (response, _) = D.text_parts({"instruction": 3, "input": float("nan"), "output": 4}, "alpaca", TOK)
  assert "### Instruction:\n3\n" in prompt and "### Input:" not in prompt and response == "4\x02"
  assert len(D.tokenize(rows, "alpaca", TOK, 1024, 256, False)) == 3


def test_json_with_one_key_holding_the_rows(tmp_path):
  rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
  (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
  assert list(D.load_rows(str(tmp_path / "d.json"))) == rows
  (tmp_path / "l.json").write_text(json.dumps(rows, indent=1))
  assert list(D.load_rows(str(tmp_path / "l.json"))) == rows
  for doc in ({"version": 1, "data": rows}, {"text": "a"}, "text"):
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"bad\.json: a JSON .*expected a list of row objects"):
      D.load_rows(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name, text", [("zero.jsonl", ""), ("list.json", "[]\n"), ("blank.jsonl", "\n \n\n"),
                                        ("zero.csv", ""), ("header.csv", "instruction,input,output\n")])
def test_a_file_without_examples_is_named(tmp_path, name, text):
  (tmp_path / name).write_text(text)
  with pytest.raises(ValueError, match=f"^{tmp_path / name}: no examples .*add rows"):
    D.load_rows(str(tmp_path / name))


def test_a_bad_jsonl_line_is_named(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n')
  with pytest.raises(ValueError, match=r"data\.jsonl line 4: not valid JSON \(.*column 14\)"):
    D.load_rows(str(path))
  path.write_text('{"text": "a"}\n["b"]\n')
  with pytest.raises(ValueError, match=r"data\.jsonl line 2: a JSON list, not a row object"):
    D.load_rows(str(path))


def test_missing_columns_are_found_before_tokenizing(tmp_path):
  path = _write(tmp_path, [{"instruction": "x", "response": "y"}, {"instruction": "z", "response": "w"}])
  rows = D.load_rows(path)
  with pytest.raises(ValueError, match=r"d\.jsonl: the 'alpaca' format needs a 'output' column; "
                                       r"columns found: \['instruction', 'response'\]; rename"):
    D.check_rows(rows, "alpaca", path)
  with pytest.raises(ValueError, match="needs a 'messages' or 'conversations' column"):
    D.train_eval_rows(path, "", 1, 0, dataset_format="chat")
  texts = _write(tmp_path, [{"text": "a"}], "t.jsonl")
  with pytest.raises(ValueError, match="set dataset_format to 'oasst1' or 'text'"):
    D.check_rows(D.load_rows(texts), "alpaca", texts)
  ok = _write(tmp_path, [{"messages": CONVERSATION}], "ok.jsonl")
  chats = _write(tmp_path, [{"messages": [{"role": "user", "content": "q"}]}], "c.jsonl")
  with pytest.raises(ValueError, match=r"c\.jsonl example 1: a chat example needs an assistant message"):
    D.train_eval_rows(ok, chats, 1, 0, dataset_format="chat")
  D.check_rows(D.load_rows(ok), "chat")

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
