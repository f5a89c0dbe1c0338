"""GGUF files of each family llama.cpp exports, read as their transformers checkpoints.

Each tiny random transformers model is written as llama.cpp's converter writes it
(tests/gguf_writer.py); transformers' own GGUF reader checks that file (its weights come back
equal), then ours converts it: the same config, the weights within NF4's error of the originals
(a wrong permutation or a norm off by one is far outside it), and float32 logits equal to
transformers' on the same dequantized weights."""

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as q
from qlora_jax.io.convert import convert
from tests.conftest import has

pytestmark = pytest.mark.skipif(not (has("torch") and has("gguf")), reason="needs torch (CPU) and gguf")

# family in tests/hf_reference.FAMILIES -> (llama.cpp architecture, what GGUF cannot carry changed)
CASES = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen2": ("qwen2", {}),
    # transformers' GGUF reader ignores qwen3's key_length (takes Qwen3Config's head_dim, 128)
    "qwen3": ("qwen3", dict(head_dim=128)),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=32)),  # llama.cpp's: head_dim below 27B
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=32, layer_types=None)),  # llama.cpp's pattern: 5 + 1
    "phi3": ("phi3", {}),
    "phi4mini": ("phi3", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  from tests import hf_reference
  from tests.gguf_writer import write_gguf

  family = request.param
  arch, changes = CASES[family]
  spec = {**hf_reference.FAMILIES[family], **changes}
  layers = 6 if family == "gemma3" else 2
  tmp = tmp_path_factory.mktemp(family)
  saved = dict(hf_reference.FAMILIES)
  hf_reference.FAMILIES[family] = {k: v for k, v in spec.items() if v is not None}
  try:
    hf = hf_reference.tiny_hf_model(family, layers=layers)
  finally:
    hf_reference.FAMILIES.clear()
    hf_reference.FAMILIES.update(saved)
  path = write_gguf(hf, tmp / f"{family}.gguf", arch)
  return family, hf, path, tmp


def test_transformers_reads_the_written_file_back(case):
  """The writer's check: transformers' GGUF reader recovers every weight (Gemma's norms to the
  rounding of adding and removing one)."""
  import transformers

  family, hf, path, _ = case
  back = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype="float32", pad_token_id=0)
  ours, theirs = hf.state_dict(), back.state_dict()
  for name, tensor in ours.items():
    np.testing.assert_allclose(theirs[name].numpy(), tensor.numpy(), rtol=0, atol=1e-6, err_msg=f"{family}: {name}")


def test_converted_gguf_matches_transformers(case):
  from tests.hf_reference import hf_logits, load_ours_into_torch, max_rel_error

  family, hf, path, tmp = case
  convert(str(path), tmp / "out", dense_dtype="float32", progress=False)
  assert not list((tmp / "out").glob("tokenizer*")), "no tokenizer in the file, none converted"
  ours, _ = q.load_model(tmp / "out", jnp.float32, tokenizer=False)
  cfg, ref = ours.config, hf.config
  head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
  assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (
      ref.model_type, head_dim, ref.num_key_value_heads, ref.tie_word_embeddings)
  assert cfg.sliding_window == getattr(ref, "sliding_window", None)
  assert cfg.attention_scale == pytest.approx(getattr(ref, "query_pre_attn_scalar", cfg.head_dim) ** -0.5)
  types = getattr(ref, "layer_types", None) or ()
  assert cfg.local_layers == (tuple(t == "sliding_attention" for t in types) if len(set(types)) > 1 else ())
  assert cfg.rotary_dim == int(cfg.head_dim * ref.rope_parameters.get("partial_rotary_factor", 1.0))

  # The weights: dense ones exact, 4-bit ones within NF4's error of the originals.
  from flax import nnx
  originals = hf.state_dict()
  for path_, module in nnx.iter_modules(ours):
    if isinstance(module, q.QLoRALinear):
      name = ".".join(map(str, path_))
      w = np.asarray(q.dequantize(module.weight.get_value(), jnp.float32))
      group = next((g for g in ("qkv_proj", "gate_up_proj") if f"{name.rsplit('.', 1)[0]}.{g}.weight" in originals), None)
      ref_w = originals.get(f"{name}.weight")
      if ref_w is None:  # Phi-3: the part's rows of the fused original
        from qlora_jax.nn.families import fused_rows
        fused = originals[f"{name.rsplit('.', 1)[0]}.{group}.weight"].numpy()
        ref_w = fused[fused_rows(group, cfg.linear_shapes)[name.rsplit(".", 1)[1]]]
      ref_w = np.asarray(ref_w)
      err = np.linalg.norm(w - ref_w) / np.linalg.norm(ref_w)
      assert err < 0.15, f"{family}: {name} is {err:.2f} off the original (NF4 gives ~0.1)"
  for path_, var in nnx.to_flat_state(nnx.state(ours, q.FrozenParam)):
    name = ".".join(map(str, path_))
    np.testing.assert_allclose(np.asarray(var.get_value()), originals[name].numpy(), rtol=1e-6, atol=1e-6,
                               err_msg=f"{family}: {name}")

  load_ours_into_torch(ours, hf)
  ids = np.random.default_rng(1).integers(0, 160, (2, 16)).astype(np.int32)
  assert max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids)) <= 1e-4


def test_an_unknown_architecture_is_refused_by_name(tmp_path):
  import gguf

  w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="unknown GGUF architecture 'mamba'.*supported"):
    convert(str(tmp_path / "m.gguf"), tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()
