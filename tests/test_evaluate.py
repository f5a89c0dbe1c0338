"""The MMLU-layout evaluator and held-out perplexity, against transformers (float32, the same
dequantized weights) scoring the same prompts one sequence at a time."""

import csv

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import evaluate
from tests.conftest import has

pytestmark = pytest.mark.skipif(not has("torch"), reason="needs torch (CPU): pip install -e .[test]")

ROWS = {  # subject: (dev rows, test rows); made up, the answers arbitrary
    "tiny_math": ([["1 + 1 =", "1", "2", "3", "4", "B"], ["2 + 3 =", "5", "6", "7", "8", "A"]],
                  [["3 + 3 =", "5", "6", "7", "9", "B"], ["9 - 4 =", "4", "3", "5", "6", "C"],
                   ["2 * 4 =", "6", "7", "9", "8", "D"]]),
    "colors": ([["The sky on a clear day is", "green", "blue", "red", "black", "B"]],
               [["Grass is", "green", "purple", "white", "orange", "A"],
                ["Snow is", "black", "blue", "white", "red", "C"]]),
}


def _write_mmlu(folder):
  for part in ("dev", "test"):
    (folder / part).mkdir(parents=True)
  for subject, (dev, test) in ROWS.items():
    for part, rows in (("dev", dev), ("test", test)):
      with open(folder / part / f"{subject}_{part}.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
  return folder


@pytest.fixture(scope="module")
def models(tiny_model_dir):
  from transformers import AutoModelForCausalLM

  import qlora_jax as q
  from tests.hf_reference import load_ours_into_torch

  ours, tokenizer = q.load_model(tiny_model_dir, jnp.float32)
  hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir.parent / "src"), dtype="float32")
  load_ours_into_torch(ours, hf)
  return ours, hf, tokenizer


def _reference_logprobs(hf, tokenizer, text):
  """Each letter's continuation scored alone: float64 log-softmax of transformers' logits."""
  import torch

  base = tokenizer(text, add_special_tokens=False)["input_ids"]
  out = []
  for letter in evaluate.LETTERS:
    full = tokenizer(text + " " + letter, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(base), len(full)) and base[start] == full[start]:
      start += 1
    with torch.no_grad():
      logits = hf(torch.tensor([full])).logits[0].double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    out.append(sum(logp[j - 1, full[j]] for j in range(max(start, 1), len(full))))
  return np.asarray(out)


def test_prompt_has_the_mmlu_wording():
  q = evaluate.Question("2 + 2 =", ("3", "4", "5", "6"), "B")
  text = evaluate.prompt("elementary_mathematics", [q], q)
  assert text == ("The following are multiple choice questions (with answers) about elementary "
                  "mathematics.\n\n2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                  "2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_mmlu_scores_match_transformers(models, tmp_path):
  """Every test question's four letter log-likelihoods (k-shot prompt) equal transformers' within
  float32 error, and the reported accuracies are those of transformers' choices."""
  ours, hf, tokenizer = models
  folder = _write_mmlu(tmp_path / "mmlu")
  expected, hits, total = {}, 0, 0
  for subject, (dev, test) in evaluate.read_mmlu(folder).items():
    right = 0
    for q in test:
      text = evaluate.prompt(subject, dev[:5], q)
      ref = _reference_logprobs(hf, tokenizer, text)
      np.testing.assert_allclose(evaluate.letter_logprobs(ours, tokenizer, text), ref, atol=2e-3)
      right += evaluate.LETTERS[int(np.argmax(ref))] == q.answer
    expected[subject] = right / len(test)
    hits, total = hits + right, total + len(test)
  expected["average"] = hits / total
  assert evaluate.mmlu(ours, tokenizer, folder, shots=5) == pytest.approx(expected)


def test_bad_mmlu_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="no test/<subject>_test.csv"):
    evaluate.read_mmlu(tmp_path)
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
  with pytest.raises(ValueError, match=r"x_test.csv row 1: expected question, A, B, C, D, answer letter"):
    evaluate.read_mmlu(tmp_path)


def test_perplexity_is_the_exponential_of_the_mean_target_loss(models, tmp_path):
  """--data: the mean loss over the target tokens, computed here from transformers' logits."""
  import json

  import torch

  from qlora_jax import data as data_lib

  ours, hf, tokenizer = models
  rows = [{"instruction": "Say hi", "input": "", "output": "hi there"},
          {"instruction": "Count", "input": "to three", "output": "one two three"}]
  path = tmp_path / "held_out.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  loss, ppl = evaluate.perplexity(ours, tokenizer, str(path), "alpaca", 64)
  tokenized = data_lib.tokenize(data_lib.load_rows(str(path)), "alpaca", tokenizer, 32, 32, False)
  total = count = 0.0
  for ids, labels in zip(tokenized.inputs, tokenized.labels):
    with torch.no_grad():
      logits = hf(torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    for j, label in enumerate(labels):
      if label != data_lib.IGNORE:
        total -= logp[j, label]
        count += 1
  assert loss == pytest.approx(total / count, rel=1e-4) and ppl == pytest.approx(np.exp(loss))
