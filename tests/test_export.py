"""Export: the PEFT adapter loads in peft with our logits; the merged checkpoint in transformers;
PEFT's own adapters (regex targets, rank/alpha patterns, some layers only) load with PEFT's logits."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.train import trainer
from qlora_jax.export import DEFAULT_ORIGINAL, load_adapter, load_run, main as export_main, original_name
from qlora_jax.format.folder import read_meta
from qlora_jax.format.quantization import QuantConfig
from qlora_jax.io.convert import convert
from qlora_jax.io.sources import DEFAULT_GGUF
from qlora_jax.train.config_files import load_config
from tests.conftest import has

pytestmark = pytest.mark.skipif(not (has("torch") and has("peft")), reason="needs torch and peft")


@pytest.fixture(scope="module")
def exact_base(tiny_model_dir, tmp_path_factory):
  """(transformers folder, its converted folder) whose 4-bit weights dequantize to exactly the
  folder's: tiny_model_dir dequantized to float32, re-converted without double quantization
  (NF4 of NF4 values is then lossless), so PEFT on the folder and we on the 4-bit copy compute
  the same model."""
  root = tmp_path_factory.mktemp("exact")
  _hf_base(tiny_model_dir).save_pretrained(str(root / "src"))
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (tiny_model_dir / f).is_file():
      shutil.copy(tiny_model_dir / f, root / "src" / f)
  convert(str(root / "src"), root / "nf4", QuantConfig(double_quant=False), dense_dtype="float32",
          progress=False)
  return root / "src", root / "nf4"


@pytest.fixture(scope="module")
def trained_run(exact_base, tmp_path_factory):
  run = tmp_path_factory.mktemp("export") / "run"
  # lr high enough that B moves well away from zero in a few steps.
  cfg = load_config("tiny_test", [f"model_dir={exact_base[1]}", "model_source=", f"output_dir={run}",
                                  "steps=4", "learning_rate=1e-2", "lora_targets=q_proj,v_proj,down_proj",
                                  "double_quant=false"])
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


def _assert_peft_logits(peft_model, ours, seed: int) -> None:
  """Our float32 logits equal the float32 PEFT model's, and its adapter changes them."""
  import torch

  ids = np.random.default_rng(seed).integers(0, 49152, (2, 10)).astype(np.int32)
  with torch.no_grad():
    ref = peft_model(torch.from_numpy(ids).long()).logits.numpy()
    with peft_model.disable_adapter():
      ref_base = peft_model(torch.from_numpy(ids).long()).logits.numpy()
  mine = np.asarray(ours(jnp.asarray(ids)), np.float32)
  scale = np.abs(ref).max()
  effect = np.abs(ref - ref_base).max() / scale
  err = np.abs(mine - ref).max() / scale
  print(f"\nadapter effect {effect:.1e}; ours vs transformers+peft (both float32): {err:.1e}")
  assert effect > 0.02, "the adapter must change the logits for this to test anything"
  assert err < 1e-4


def test_peft_adapter_loads_in_peft_with_our_logits(trained_run, tmp_path):
  import peft

  assert export_main([str(trained_run), str(tmp_path / "adapter")]) == 0
  cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  run_cfg, _, _ = load_run(trained_run)
  ours, _ = load_adapter(run_cfg.model.model_dir, tmp_path / "adapter", jnp.float32)
  hf = peft.PeftModel.from_pretrained(_hf_base(run_cfg.model.model_dir), str(tmp_path / "adapter")).eval()
  _assert_peft_logits(hf, ours, seed=0)


def test_exported_adapter_names_the_original_model_and_auto_peft_loads_it(exact_base, trained_run, tmp_path):
  import peft
  import torch

  src, nf4 = exact_base
  assert export_main([str(trained_run), str(tmp_path / "adapter")]) == 0
  cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert cfg["base_model_name_or_path"] == str(src)  # not the 4-bit folder transformers cannot read
  hf = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32).eval()
  ours, _ = load_adapter(nf4, tmp_path / "adapter", jnp.float32)
  _assert_peft_logits(hf, ours, seed=3)


@pytest.mark.parametrize("source, original", [
    ("hub:HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M"),
    ("/models/llama-3-8b", "/models/llama-3-8b"),
    (f"/venv/site-packages/{DEFAULT_GGUF[0]}/{DEFAULT_GGUF[1]}", DEFAULT_ORIGINAL),
    ("default", DEFAULT_ORIGINAL),
    ("/models/other.Q4_0.gguf", "/models/other.Q4_0.gguf"),
])
def test_original_name_of_each_kind_of_source(source, original):
  assert original_name(source) == original


def test_the_embedded_default_names_its_hub_model(smollm2_dir):
  assert original_name(read_meta(smollm2_dir)["source"]) == "HuggingFaceTB/SmolLM2-135M-Instruct"


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


# PEFT LoraConfig features (r=4, lora_alpha=8 unless a pattern says otherwise).
PEFT_FEATURES = {
    "regex": dict(target_modules=r".*\.(q_proj|v_proj)$"),
    "regex_some_layers": dict(target_modules=r"model\.layers\.1\.(self_attn\.[kv]_proj|mlp\.down_proj)"),
    "rank_alpha_patterns": dict(
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"v_proj": 8, r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"down_proj": 32.0, r"model\.layers\.0\.self_attn\.o_proj": 3.0}),
    "rslora_patterns": dict(target_modules=["k_proj", "o_proj", "down_proj"], use_rslora=True,
                            rank_pattern={"down_proj": 6}, alpha_pattern={"layers.1.self_attn.o_proj": 20.0}),
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[1]),
    "layers_pattern_exclude": dict(target_modules=["v_proj", "up_proj", "o_proj"], layers_to_transform=[0],
                                   layers_pattern="layers", exclude_modules=["model.layers.0.mlp.up_proj"]),
}


def _peft_adapter(src, out, seed: int = 0, **features):
  """A PEFT model on the transformers folder, with random non-zero A and B, saved to out."""
  import peft
  import torch
  import transformers

  base = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
  model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **features)).eval()
  torch.manual_seed(seed)
  with torch.no_grad():  # PEFT starts B at zero: an adapter that changes nothing tests nothing
    for name, p in model.named_parameters():
      if "lora_" in name:
        torch.nn.init.normal_(p, std=0.3)
  model.save_pretrained(str(out))
  return model


@pytest.mark.parametrize("features", PEFT_FEATURES.values(), ids=PEFT_FEATURES.keys())
def test_adapters_made_by_peft_load_with_peft_logits(exact_base, tmp_path, features):
  src, nf4 = exact_base
  hf = _peft_adapter(src, tmp_path / "adapter", **features)
  ours, _ = load_adapter(nf4, tmp_path / "adapter", jnp.float32)
  _assert_peft_logits(hf, ours, seed=4)


@pytest.fixture(scope="module")
def plain_peft_adapter(exact_base, tmp_path_factory):
  path = tmp_path_factory.mktemp("plain") / "adapter"
  _peft_adapter(exact_base[0], path, target_modules=["q_proj"])
  return path


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("bias", "all"), ("lora_bias", True), ("modules_to_save", ["lm_head"]),
    ("fan_in_fan_out", True), ("init_lora_weights", "pissa"), ("layer_replication", [[0, 2]]),
    ("trainable_token_indices", [1, 2]), ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("target_parameters", ["mlp.gate.weight"]),
    ("peft_type", "LOHA"),
])
def test_what_we_cannot_compute_exactly_is_refused_naming_the_field(exact_base, plain_peft_adapter, tmp_path,
                                                                     field, value):
  adapter = shutil.copytree(plain_peft_adapter, tmp_path / "adapter")
  cfg = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
  with pytest.raises(ValueError, match=field) as e:
    load_adapter(exact_base[1], adapter, jnp.float32)
  assert "\n" not in str(e.value)


def test_adapter_weights_for_layers_we_do_not_adapt_are_refused(exact_base, tmp_path):
  _peft_adapter(exact_base[0], tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
  with pytest.raises(ValueError, match="lm_head") as e:
    load_adapter(exact_base[1], tmp_path / "adapter", jnp.float32)
  assert "\n" not in str(e.value)


def test_a_bf16_peft_adapter_loads(trained_run, tmp_path):
  """Adapters saved in bfloat16 (PEFT with a bf16 model) load: numpy alone cannot read them."""
  from safetensors import safe_open
  from safetensors.flax import save_file as save_flax

  from qlora_jax import export

  out = tmp_path / "adapter"
  assert export.main([str(trained_run), str(out)]) == 0
  with safe_open(str(out / "adapter_model.safetensors"), "flax") as f:
    bf16 = {k: f.get_tensor(k).astype(jnp.bfloat16) for k in f.keys()}
  save_flax(bf16, str(out / "adapter_model.safetensors"))
  model_dir = export.run_config(trained_run).model.model_dir
  model, _ = export.load_adapter(model_dir, out)
  assert any(float(jnp.abs(m.lora_b[...]).max()) > 0 for _, m, _ in export.linear_modules(model)
             if m.lora is not None)
