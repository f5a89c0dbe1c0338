"""Export: the PEFT adapter loads in peft with our logits; the merged checkpoint in transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.train import trainer
from qlora_jax.export import load_adapter, load_run, main as export_main
from qlora_jax.train.config_files import load_config
from tests.conftest import has

pytestmark = pytest.mark.skipif(not (has("torch") and has("peft")), reason="needs torch and peft")


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
  run = tmp_path_factory.mktemp("export") / "run"
  # lr high enough that B moves well away from zero in a few steps.
  cfg = load_config("tiny_test", [f"model_dir={tiny_model_dir}", "model_source=", f"output_dir={run}",
                                  "steps=4", "learning_rate=1e-2", "lora_targets=q_proj,v_proj,down_proj"])
  trainer.train(cfg)
  return run


def _hf_base(model_dir):
  """transformers float32 model holding our dequantized base weights."""
  import torch
  import transformers

  from tests.hf_reference import load_ours_into_torch
  import qlora_jax as q

  ours, _ = q.load_model(model_dir, jnp.float32, tokenizer=False)
  cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
  hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
  load_ours_into_torch(ours, hf)
  return hf


def test_peft_adapter_loads_in_peft_with_our_logits(trained_run, tmp_path):
  import peft
  import torch

  assert export_main([str(trained_run), str(tmp_path / "adapter")]) == 0
  cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  run_cfg, _, _ = load_run(trained_run)
  ours, _ = load_adapter(run_cfg.model.model_dir, tmp_path / "adapter", jnp.float32)
  hf = peft.PeftModel.from_pretrained(_hf_base(run_cfg.model.model_dir), str(tmp_path / "adapter")).eval()
  ids = np.random.default_rng(0).integers(0, 49152, (2, 10)).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids).long()).logits.numpy()
  base = _hf_base(run_cfg.model.model_dir)
  with torch.no_grad():
    ref_base = base(torch.from_numpy(ids).long()).logits.numpy()
  mine = np.asarray(ours(jnp.asarray(ids)), np.float32)
  scale = np.abs(ref).max()
  effect = np.abs(ref - ref_base).max() / scale
  err = np.abs(mine - ref).max() / scale
  print(f"\nadapter effect {effect:.1e}; ours vs transformers+peft (both float32): {err:.1e}")
  assert effect > 0.02, "the adapter must change the logits for this to test anything"
  assert err < 1e-4


def test_peft_adapter_and_run_folder_load_back_identically(trained_run, tmp_path):
  export_main([str(trained_run), str(tmp_path / "adapter")])
  cfg, from_run, _ = load_run(trained_run)
  from_peft, _ = load_adapter(cfg.model.model_dir, tmp_path / "adapter")
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 49152, (1, 8)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(from_run(ids)), np.asarray(from_peft(ids)))


def test_merged_checkpoint_loads_in_transformers(trained_run, tmp_path):
  import torch
  import transformers

  assert export_main([str(trained_run), str(tmp_path / "merged"), "--merge"]) == 0
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
  _, ours, _ = load_run(trained_run)
  ids = np.random.default_rng(2).integers(0, 49152, (2, 10)).astype(np.int32)
  with torch.no_grad():
    ref = merged(torch.from_numpy(ids).long()).logits.numpy()
  err = np.abs(np.asarray(ours(jnp.asarray(ids))) - ref).max() / np.abs(ref).max()
  print(f"\nmerged bf16 checkpoint in transformers vs ours: max relative error {err:.1e}")
  assert err < 3e-2  # the merged weights are rounded to bf16


def test_export_of_a_folder_without_checkpoint_is_refused(tmp_path, capsys):
  assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
  assert "not a training run folder" in capsys.readouterr().err
