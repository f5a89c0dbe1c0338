"""scripts/pretrain_corpus.py and scripts/pretrain.py at a tiny scale on CPU: the corpus split by
file without overlap, a model pretrained from scratch whose held-out loss falls, saved as a bf16
transformers checkpoint that our converter reads (issue 30's 16-bit base)."""

import json
import sys

import numpy as np
import pytest

from tests.conftest import has

pytestmark = pytest.mark.skipif(not has("torch"), reason="needs torch (CPU): pip install -e .[test]")


def test_corpus_and_pretraining_make_a_16_bit_base(tmp_path, smollm2_dir):
  import torch
  import transformers

  from tests.test_train import ROOT

  sys.path.insert(0, str(ROOT / "scripts"))
  import pretrain
  import pretrain_corpus

  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "value", "the", "list", "for", "in", "if", "None", "class"]
  for i in range(120):  # 120 small files of a toy language with structure to learn
    lines = [" ".join(rng.choice(words, 6)) + f" {j % 7}" for j in range(40)]
    (src / f"m{i}.py").write_text("\n".join(lines))
  (src / "dup.py").write_text((src / "m0.py").read_text())  # a duplicate: dropped
  corpus = tmp_path / "corpus"
  meta = pretrain_corpus.build(corpus, str(smollm2_dir), [src], progress=False, pydoc=False)
  assert meta["train_files"] + meta["val_files"] == 120
  assert meta["val_files"] >= 1 and meta["train_tokens"] > 5 * meta["val_tokens"]
  train = np.fromfile(corpus / "train.bin", np.uint16)
  assert len(train) == meta["train_tokens"] and train.max() < meta["vocab"]

  out = tmp_path / "base"
  log = pretrain.pretrain(corpus, out, size="tiny", tokens=64 * 8 * 40, batch=8, seq=64, lr=3e-3,
                          eval_every=20, progress=False)
  first, last = log["eval"][0][1], log["eval"][-1][1]
  assert last < first - 0.5, log["eval"]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
  assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
  assert json.loads((out / "pretrain_log.json").read_text())["parameters"] > 0
  # a wall-clock budget stops the run early, evaluated and saved, and the log says where
  cut = pretrain.pretrain(corpus, tmp_path / "cut", size="tiny", tokens=64 * 8 * 40, batch=8, seq=64, lr=3e-3,
                          eval_every=20, progress=False, max_seconds=1e-9)
  assert cut["stopped_at_step"] == 1 and len(cut["train"]) == 1 and cut["eval"][-1][0] == 1
  assert (tmp_path / "cut" / "model.safetensors").is_file()
  with pytest.raises(SystemExit, match="--max-seconds must be >= 0"):
    pretrain.main([str(corpus), str(tmp_path / "never"), "--max-seconds", "-1"])
  assert not (tmp_path / "never").exists()

  # quality.py studies it in place of the config's model: converted beside it, the report says
  # what the model is and where it came from
  import quality

  report = tmp_path / "report"
  assert quality.main(["--model", str(out), "--parts", "weights", "--gaussian-elements", "4096",
                       "--out-dir", str(report)]) == 0
  assert (tmp_path / "base.converted" / "config.json").is_file()
  text = (report / "QUALITY.md").read_text()
  assert "pretrained here" in text and f"{log['parameters']:,} parameters" in text, text[:1500]
  assert "Q4_1" not in text and "| NF4 + DQ | 4.1" in text and "| INT4 | 4.500 |" in text
