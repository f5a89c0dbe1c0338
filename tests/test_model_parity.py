"""Logits parity with transformers (torch, float32) on the same dequantized weights."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as q
from qlora_jax.io.convert import convert
from qlora_jax.nn.kv_cache import KVCache
from tests.conftest import has

pytestmark = pytest.mark.skipif(not has("torch"), reason="needs torch (CPU): pip install -e .[test]")
TOL = 1e-4  # max |ours - hf| / max |hf|, float32


@pytest.fixture(scope="module", params=["llama", "llama3.2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3",
                                                "phi3", "phi4mini", "phi3.5"])
def pair(request, tmp_path_factory):
  from tests.hf_reference import converted, tiny_hf_model

  hf = tiny_hf_model(request.param)
  ours, folder = converted(hf, tmp_path_factory.mktemp(request.param))
  return request.param, ours, hf, folder


def test_config_features_are_read(pair):
  family, ours, _, _ = pair
  cfg = ours.config
  expect = {"llama": dict(rope_type="llama3", ratio=4, tied=False),
            "llama3.2": dict(rope_type="llama3", ratio=3, tied=True),
            "mistral": dict(rope_type="default", ratio=1, tied=True),
            "qwen2": dict(rope_type="default", ratio=3, tied=False),
            "qwen3": dict(rope_type="default", ratio=2, tied=True),
            "gemma2": dict(rope_type="default", ratio=2, tied=True),
            "gemma3": dict(rope_type="linear", ratio=4, tied=True),
            "phi3": dict(rope_type="default", ratio=2, tied=False),
            "phi4mini": dict(rope_type="default", ratio=3, tied=True),
            "phi3.5": dict(rope_type="longrope", ratio=2, tied=False)}[family]
  gemma = family.startswith("gemma")
  assert cfg.rope.rope_type == expect["rope_type"]
  assert cfg.num_attention_heads // cfg.num_key_value_heads == expect["ratio"]
  assert cfg.tie_word_embeddings == expect["tied"]
  assert cfg.qkv_bias == (family == "qwen2")
  assert cfg.sliding_window == {"mistral": 6, "gemma2": 6, "gemma3": 5, "phi3": 7}.get(family)
  assert cfg.rotary_dim == {"phi4mini": 18, "phi3.5": 12}.get(family, cfg.head_dim)
  assert cfg.local_layers == ((True, False) if gemma else ())
  assert cfg.family.qk_norm == (family in ("qwen3", "gemma3"))
  assert cfg.family.norm_plus_one == cfg.family.sandwich_norms == cfg.family.scaled_embedding == gemma
  assert cfg.hidden_act == ("gelu_pytorch_tanh" if gemma else "silu")
  assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == ((1.0, 0.5) if family == "gemma2" else (None, None))
  assert (cfg.rope_local is not None and cfg.rope_local.theta) == (family == "gemma3" and 10000.0)
  assert cfg.attention_scale == {"gemma2": 24 ** -0.5}.get(family, cfg.head_dim ** -0.5)
  head_dim = {"qwen3": 40, "gemma2": 32, "gemma3": 32}.get(family, cfg.hidden_size // cfg.num_attention_heads)
  assert cfg.head_dim == head_dim


def test_logits_match_transformers(pair):
  from tests.hf_reference import hf_logits, max_rel_error

  family, ours, hf, _ = pair
  ids = np.random.default_rng(1).integers(0, 160, (2, 16)).astype(np.int32)
  err = max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids))
  print(f"\n{family}: max relative logit error {err:.1e}")
  assert err <= TOL


def test_scanned_layers_of_two_kinds_attend_without_masks(pair):
  """Gemma 2 / 3 scanned, rows longer than the window, no attention_mask: each layer's kernel
  applies its own window (lax.cond between the local and the global kernel), no [B, T, T] mask is
  built, and the logits still equal transformers'."""
  from tests.hf_reference import hf_logits, max_rel_error

  family, _, hf, folder = pair
  if not family.startswith("gemma"):
    pytest.skip("layers of two kinds: gemma2, gemma3")
  scanned, _ = q.load_model(folder, jnp.float32, q.ModelOptions(scan_layers=True), tokenizer=False)
  ids = np.random.default_rng(2).integers(0, 160, (2, 16)).astype(np.int32)
  from flax import nnx

  graphdef, state = nnx.split(scanned)
  jaxpr = str(jax.make_jaxpr(lambda st, i: nnx.merge(graphdef, st)(i))(state, jnp.asarray(ids)))
  assert "cond[" in jaxpr and "bool[2,16,16]" not in jaxpr
  assert max_rel_error(scanned(jnp.asarray(ids)), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("remat", ["full", "offload_attention"])
def test_mask_free_layers_of_two_kinds_train_like_the_masked_path(pair, remat):
  """With LoRA dropout, scanned and rematerialized: the loss and every LoRA gradient of the
  mask-free path (no attention_mask) equal the masked path's (an all-ones attention_mask), the
  dropout streams drawn alike."""
  from flax import nnx

  family, _, _, folder = pair
  if family != "gemma3":
    pytest.skip("gemma3's run covers the layers of two kinds in training")
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 160, (2, 12)), jnp.int32)
  out = []
  for mask in (None, jnp.ones(ids.shape, jnp.int32)):
    opts = q.ModelOptions(lora=q.LoraConfig(rank=4, dropout=0.25), remat=remat, scan_layers=True)
    model, _ = q.load_model(folder, jnp.float32, opts, tokenizer=False)
    _set_adapters(model)
    model.train()
    loss = lambda m: jnp.mean(m(ids, mask) ** 2)  # noqa: E731
    value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    out.append((float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  for a, b in zip(out[0][1], out[1][1], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_longrope_past_the_original_context_matches_transformers(pair):
  """40 tokens, past longrope's original 32: the long factors and the attention factor apply
  (with the short ones the logits are 6e-3 off), as transformers decides per call."""
  from tests.hf_reference import hf_logits, max_rel_error

  family, ours, hf, _ = pair
  if ours.config.rope.rope_type != "longrope":
    pytest.skip("longrope only")
  assert ours.config.rope.attention_factor == pytest.approx((1 + np.log(64 / 32) / np.log(32)) ** 0.5)
  ids = np.random.default_rng(7).integers(0, 160, (2, 40)).astype(np.int32)
  assert max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids)) <= TOL


def test_padded_batch_matches_transformers(pair):
  from tests.hf_reference import hf_logits, max_rel_error

  _, ours, hf, _ = pair
  ids = np.random.default_rng(2).integers(0, 160, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  ours_logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  assert max_rel_error(ours_logits[mask == 1], hf_logits(hf, ids, mask)[mask == 1]) <= TOL


def _skip_unrolled_decoding(family: str, scan: bool) -> None:
  """Decoding through unrolled layers is one code path for every family but Gemma 3's two kinds
  of layer (picked by a Python bool there, by a scanned flag under scan): llama and gemma3 run
  it, the rest decode scanned only (the CPU suite's time)."""
  if not scan and family not in ("llama", "gemma3"):
    pytest.skip("unrolled decoding: llama's and gemma3's runs cover it")


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode_equals_full_forward(pair, scan):
  family, ours, _, folder = pair
  _skip_unrolled_decoding(family, scan)
  if scan:
    ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(scan_layers=True), tokenizer=False)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 160, (2, 12)), jnp.int32)
  full = ours(ids)
  cache = KVCache.empty(ours.config, 2, 16, jnp.float32)
  first, cache = ours.decode(ids[:, :7], cache)
  rest = []
  for t in range(7, 12):
    step, cache = ours.decode(ids[:, t:t + 1], cache)
    rest.append(step)
  stepped = jnp.concatenate([first] + rest, axis=1)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_generation_matches_transformers(pair, scan):
  """generate() (prompts left-padded into one batch, the KV cache, the prefill and two compiled
  chunks of steps) against transformers' greedy generate of each prompt alone, float32."""
  from tests.hf_reference import assert_greedy_matches

  family, ours, hf, folder = pair
  _skip_unrolled_decoding(family, scan)
  if scan:
    ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(scan_layers=True), tokenizer=False)
  assert_greedy_matches(ours, hf)


def _set_adapters(model, rank=4):
  """Nonzero A and B chosen by layer name, so differently built models hold the same adapters."""
  import zlib

  from qlora_jax.export import linear_modules

  for name, layer, i in linear_modules(model):
    if layer.lora is None:
      continue
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for attr, shape in (("lora_a", (layer.in_features, rank)), ("lora_b", (rank, layer.out_features))):
      value = jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32)
      var = getattr(layer, attr)
      var[...] = value if i is None else var[...].at[i].set(value)


def peft_round_trip(folder, hf, out, tol: float = TOL):
  """Adapters set on our model of `folder`, exported to PEFT in `out`, loaded by peft on hf:
  (our model, ids, peft's logits), checked to equal ours and our import of the export's."""
  import copy

  import peft
  import torch

  from qlora_jax.export import load_adapter, write_peft
  from qlora_jax.train.config import DataConfig, ModelSetup, TrainConfig
  from tests.hf_reference import hf_logits, max_rel_error

  lora = q.LoraConfig(rank=4, alpha=8.0)
  ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(lora=lora, scan_layers=True), tokenizer=False)
  _set_adapters(ours)
  cfg = TrainConfig(model=ModelSetup(model_dir=str(folder)), lora=lora, data=DataConfig(dataset="-"))
  write_peft(cfg, ours, out)
  adapted = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
  ids = np.random.default_rng(5).integers(0, 160, (2, 16)).astype(np.int32)
  with torch.no_grad():
    ref = adapted(torch.from_numpy(ids).long()).logits.numpy()
  assert max_rel_error(hf_logits(hf, ids), ref) > 1e-2, "the adapter must change the logits"
  assert max_rel_error(ours(jnp.asarray(ids)), ref) <= tol
  back, _ = load_adapter(folder, out, jnp.float32, tokenizer=False)  # and back to us
  assert max_rel_error(back(jnp.asarray(ids)), ref) <= tol
  return ours, ids, ref


@pytest.mark.skipif(not has("peft"), reason="needs peft")
def test_exported_adapter_loads_in_peft_with_our_logits(pair, tmp_path):
  """Our PEFT export of adapters on all seven layers of the family loads in peft on the
  transformers model (PEFT's own module names for it) and gives our float32 logits."""
  _, _, hf, folder = pair
  peft_round_trip(folder, hf, tmp_path / "adapter")


def test_merged_checkpoint_loads_in_transformers(pair, tmp_path):
  """The merged export (adapters folded into bf16 weights; a fused family's tensors fused back)
  loads in transformers with our logits, within bf16 rounding."""
  import torch
  import transformers

  from qlora_jax.export import write_merged
  from tests.hf_reference import hf_logits, max_rel_error

  family, _, _, folder = pair
  ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(lora=q.LoraConfig(rank=4, alpha=8.0)),
                         tokenizer=False)
  _set_adapters(ours)
  write_merged(ours, folder, tmp_path / "merged")
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
  ids = np.random.default_rng(8).integers(0, 160, (2, 16)).astype(np.int32)
  # bf16 weights: 3e-2 of the largest logit; Gemma 2's final softcap (0.5 here) squeezes the
  # logits, so the same rounding is 4.2e-2 of them (2.4e-6 with the weights kept in float32)
  tol = 5e-2 if family == "gemma2" else 3e-2
  assert max_rel_error(ours(jnp.asarray(ids)), hf_logits(merged, ids)) < tol, family


@pytest.mark.skipif(not has("peft"), reason="needs peft")
def test_adapter_made_by_peft_loads_with_peft_logits(pair, tmp_path):
  """An adapter PEFT makes on the transformers model (its module names: Phi-3's fused qkv_proj
  and gate_up_proj) loads into our split layers with PEFT's float32 logits."""
  import copy

  import peft
  import torch

  from qlora_jax.export import load_adapter
  from qlora_jax.nn.families import LINEAR_NAMES, family as family_of
  from tests.hf_reference import max_rel_error

  _, ours, hf, folder = pair
  targets = (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family_of(ours.config.model_type).fused
             else list(LINEAR_NAMES))
  torch.manual_seed(0)
  made = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=False)).eval()
  made.save_pretrained(str(tmp_path / "adapter"))
  loaded, _ = load_adapter(folder, tmp_path / "adapter", jnp.float32, tokenizer=False)
  ids = np.random.default_rng(6).integers(0, 160, (2, 16)).astype(np.int32)
  with torch.no_grad():
    ref = made(torch.from_numpy(ids).long()).logits.numpy()
  assert max_rel_error(loaded(jnp.asarray(ids)), ref) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_scan_and_remat_give_the_same_logits_and_gradients(tmp_path, family):
  """Unrolled vs scanned layers, and every remat policy: same loss and LoRA gradients."""
  from flax import nnx

  from qlora_jax.export import linear_modules
  from tests.hf_reference import save, tiny_hf_model

  convert(str(save(tiny_hf_model(family), tmp_path / "src")), tmp_path / "out", progress=False)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 160, (2, 8)), jnp.int32)
  results = []
  combos = ((False, "none"), (False, "full"), (False, "save_dots"), (True, "none"), (True, "full"),
            (True, "offload_attention"))
  if family != "llama":  # the family's layers, not every policy again: unrolled vs scanned, the offloads
    combos = ((False, "none"), (True, "full"), (True, "offload_attention"))
  for scan, remat in combos:
    opts = q.ModelOptions(lora=q.LoraConfig(rank=4), remat=remat, scan_layers=scan)
    model, _ = q.load_model(tmp_path / "out", jnp.float32, opts, tokenizer=False)
    _set_adapters(model)
    loss = lambda m: jnp.mean(m(ids) ** 2)  # noqa: E731
    value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    with_grads = nnx.merge(nnx.graphdef(model), grads, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    per_layer = {name: np.asarray(layer.lora_a[...] if i is None else layer.lora_a[...][i])
                 for name, layer, i in linear_modules(with_grads)}
    results.append((float(value), per_layer))
  for value, grads in results[1:]:
    np.testing.assert_allclose(value, results[0][0], rtol=1e-5)
    for name in grads:
      np.testing.assert_allclose(grads[name], results[0][1][name], rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
  return smollm2_dir


def test_smollm2_logits_match_transformers(smollm2):
  import torch
  import transformers

  from tests.hf_reference import hf_logits, load_ours_into_torch, max_rel_error

  ours, tok = q.load_model(smollm2, jnp.float32)
  cfg = transformers.AutoConfig.from_pretrained(str(smollm2))
  cfg._attn_implementation = "eager"
  hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
  load_ours_into_torch(ours, hf)
  ids = np.asarray([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]], np.int32)
  err = max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids))
  print(f"\nSmolLM2-135M: max relative logit error {err:.1e}")
  assert err <= TOL


def test_smollm2_answers_a_factual_question(smollm2):
  from qlora_jax.nn.generate import SamplingConfig, complete

  model, tok = q.load_model(smollm2)
  question = "What is the capital of France?"
  answer = complete(model, tok, [{"role": "user", "content": question}], SamplingConfig(max_new_tokens=24))
  print(f"\nQ: {question}\nA: {answer}")
  assert "Paris" in answer


def test_multimodal_gemma3_checkpoint_converts_to_its_language_model(tmp_path):
  """A Gemma 3 image-text checkpoint (google/gemma-3-*b-pt's layout: text_config,
  language_model.* names, a vision tower): the converted folder is its language model alone,
  and our logits equal transformers' image-text model on text, on the same weights."""
  import json

  import torch
  import transformers

  from tests.hf_reference import hf_logits, load_ours_into_torch, max_rel_error

  text = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"])
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                patch_size=14)
  torch.manual_seed(0)
  mm = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=159,
      boi_token_index=157, eoi_token_index=158)).eval()
  mm.save_pretrained(str(tmp_path / "src"))
  convert(str(tmp_path / "src"), tmp_path / "out", dense_dtype="float32", progress=False)
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
  ours, _ = q.load_model(tmp_path / "out", jnp.float32, tokenizer=False)
  causal = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text)).eval()
  load_ours_into_torch(ours, causal)  # our dequantized weights, then into the image-text model
  language = {k.removeprefix("model."): v for k, v in causal.state_dict().items() if k.startswith("model.")}
  mm.model.language_model.load_state_dict(language)
  ids = np.random.default_rng(9).integers(0, 150, (2, 12)).astype(np.int32)
  assert max_rel_error(ours(jnp.asarray(ids)), hf_logits(mm, ids)) <= TOL
