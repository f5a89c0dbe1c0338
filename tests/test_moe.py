"""Mixture-of-experts families (Qwen3-MoE, Mixtral) against transformers' models in float32, on
the same dequantized 4-bit experts: tiny random configs made by transformers, every expert's
packed gate_up / down tensors converted to NF4 + double quant, the router kept dense."""

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as q
from qlora_jax.io.convert import convert
from tests.conftest import has

pytestmark = pytest.mark.skipif(not has("torch"), reason="needs torch (CPU): pip install -e .[test]")

MOE = {
    # Qwen3-MoE: 8 experts, top 2 renormalized, q/k norms, head_dim 32 != 96 / 4.
    "qwen3_moe": dict(cls="Qwen3MoeConfig", hidden_size=96, intermediate_size=176, moe_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    # Qwen3-MoE's class default: the top-k weights not renormalized.
    "qwen3_moe_raw": dict(cls="Qwen3MoeConfig", hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                          num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, num_attention_heads=4,
                          num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
    # Mixtral: 4 experts of intermediate_size, top 2, always renormalized, GQA 2.
    "mixtral": dict(cls="MixtralConfig", hidden_size=96, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(MOE))
def pair(request, tmp_path_factory):
  from tests import hf_reference

  hf_reference.FAMILIES[request.param] = MOE[request.param]
  try:
    hf = hf_reference.tiny_hf_model(request.param)
  finally:
    del hf_reference.FAMILIES[request.param]
  ours, folder = hf_reference.converted(hf, tmp_path_factory.mktemp(request.param))
  return request.param, ours, hf, folder


def test_config_reads_the_experts(pair):
  name, ours, hf, _ = pair
  cfg = ours.config
  assert (cfg.num_experts, cfg.num_experts_per_tok) == (
      getattr(hf.config, "num_experts", None) or hf.config.num_local_experts, hf.config.num_experts_per_tok)
  assert cfg.norm_topk_prob == (name != "qwen3_moe_raw")
  assert cfg.moe_intermediate_size == {"mixtral": 64, "qwen3_moe": 64, "qwen3_moe_raw": 48}[name]


def test_logits_match_transformers(pair):
  from tests.hf_reference import hf_logits, max_rel_error

  name, ours, hf, _ = pair
  ids = np.random.default_rng(1).integers(0, 160, (2, 16)).astype(np.int32)
  weights, experts, _ = ours.model.layers[0].mlp.route(
      ours.model.embed_tokens.weight[...][jnp.asarray(ids)].reshape(32, -1))
  assert len(np.unique(np.asarray(experts))) == ours.config.num_experts, "every expert takes tokens"
  err = max_rel_error(ours(jnp.asarray(ids)), hf_logits(hf, ids))
  print(f"\n{name}: max relative logit error {err:.1e}")
  assert err <= 1e-4


def test_greedy_generation_matches_transformers(pair):
  """generate() on the scanned model (left-padded prompts, KV cache, compiled decode chunks)
  against transformers' greedy generate of each prompt alone."""
  from tests.hf_reference import assert_greedy_matches

  _, _, hf, folder = pair
  ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(scan_layers=True), tokenizer=False)
  assert_greedy_matches(ours, hf, max_new_tokens=12)


def test_adapters_train_through_the_experts_under_scan_and_remat(pair):
  """LoRA (on the attention: the experts are frozen 4-bit) trained through the routed experts:
  with the layers scanned, full recomputation gives the loss and gradients of no
  recomputation, and the gradients reach every layer's adapters."""
  import jax
  from flax import nnx

  from qlora_jax.train.loss import batch_loss

  name, _, _, folder = pair
  if name != "qwen3_moe":
    pytest.skip("one family is enough for the step")
  ids = jnp.asarray(np.random.default_rng(2).integers(1, 160, (2, 12)), jnp.int32)
  batch = dict(input_ids=ids, labels=jnp.roll(ids, -1, 1), positions=jnp.broadcast_to(jnp.arange(12), (2, 12)))
  results = []
  for remat in ("none", "full"):
    options = q.ModelOptions(lora=q.LoraConfig(rank=4), remat=remat, scan_layers=True, attention="xla")
    model, _ = q.load_model(folder, jnp.float32, options, tokenizer=False)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    lora = jax.tree.map(lambda x: x + 0.02, lora)  # B != 0: the adapters act

    def loss(lora_, rest_):
      total, count = batch_loss(nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (lora_, rest_))), batch)
      return total / count

    results.append(jax.jit(jax.value_and_grad(loss))(lora, rest))
  (plain, g_plain), (remat_, g_remat) = results
  np.testing.assert_allclose(float(remat_), float(plain), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(np.asarray(b)).reshape(b.shape[0], -1).max(1) > 0), "a layer got no gradient"


def test_bitsandbytes_experts_are_packed_as_stored(tmp_path):
  """A bitsandbytes 4-bit Mixtral checkpoint (each expert's w1/w3/w2 and the attention stored as
  bnb NF4 + double quant): the experts are dequantized, packed and re-quantized as stored; the
  packed experts equal the stored ones element by element to the re-encoded block scales (the
  4-bit codes kept), and the logits match transformers' on those weights."""
  import json
  import re

  from safetensors.numpy import load_file, save_file

  from tests import hf_reference

  hf_reference.FAMILIES["mixtral"] = MOE["mixtral"]
  try:
    hf = hf_reference.tiny_hf_model("mixtral", seed=5)
  finally:
    del hf_reference.FAMILIES["mixtral"]
  src = tmp_path / "src"
  hf.save_pretrained(str(src))
  stored, experts = {}, {}
  for name, w in load_file(str(src / "model.safetensors")).items():
    if re.search(r"experts\.\d+\.w[123]\.weight|self_attn\.[qkvo]_proj\.weight", name):
      qw = q.quantize(jnp.asarray(w), "nf4", 64, True)
      experts[name] = np.asarray(q.dequantize(qw, jnp.float32))
      stored.update({k: np.asarray(v) for k, v in q.to_bnb_state(qw, name).items()})
    else:
      stored[name] = w
  save_file(stored, str(src / "model.safetensors"))
  config = json.loads((src / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                   "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
  (src / "config.json").write_text(json.dumps(config))
  convert(str(src), tmp_path / "out", dense_dtype="float32", progress=False)
  ours, _ = q.load_model(tmp_path / "out", jnp.float32, tokenizer=False)
  packed = np.asarray(q.dequantize(ours.model.layers[1].mlp.experts.gate_up_proj.get_value(), jnp.float32))
  want = np.stack([np.concatenate([experts[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"]
                                   for w in ("w1", "w3")]) for e in range(4)])
  # The codes kept; each block's scale re-encoded by the double quantization (its 8-bit code
  # of the scale moves it by under 1%).
  np.testing.assert_allclose(packed, want, rtol=1e-2, atol=1e-7)
  hf_reference.load_ours_into_torch(ours, hf)
  ids = np.random.default_rng(1).integers(0, 160, (2, 16)).astype(np.int32)
  assert hf_reference.max_rel_error(ours(jnp.asarray(ids)), hf_reference.hf_logits(hf, ids)) <= 1e-4


@pytest.mark.skipif(not has("peft"), reason="needs peft")
def test_exported_adapter_loads_in_peft_with_our_logits(pair, tmp_path):
  """Adapters on the attention of an experts model: PEFT loads our export on the transformers
  model with our float32 logits, and our import of it gives them back; the merged export (the
  packed experts dequantized to bf16) loads in transformers with them too."""
  import torch
  import transformers

  from qlora_jax.export import write_merged
  from tests.hf_reference import hf_logits, max_rel_error
  from tests.test_model_parity import peft_round_trip

  name, _, hf, folder = pair
  if name == "qwen3_moe_raw":
    pytest.skip("the export does not depend on the routing: qwen3_moe and mixtral cover it")
  ours, ids, ref = peft_round_trip(folder, hf, tmp_path / "adapter", tol=1e-4)
  write_merged(ours, folder, tmp_path / "merged")
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
  assert max_rel_error(hf_logits(merged.eval(), ids), ref) <= 5e-2, name  # bf16 weights


def test_expert_configs_we_cannot_run_are_refused_by_name():
  from qlora_jax.nn.model_config import ModelConfig

  base = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16)
  assert ModelConfig.from_hf(base).num_experts == 4
  with pytest.raises(ValueError, match="mlp_only_layers=.*every layer must have experts"):
    ModelConfig.from_hf({**base, "mlp_only_layers": [0]})
  with pytest.raises(ValueError, match="num_experts_per_tok must be in 1..num_experts"):
    ModelConfig.from_hf({**base, "num_experts_per_tok": 5})
  with pytest.raises(ValueError, match="needs experts"):
    ModelConfig(head_dim=16, **{k: v for k, v in base.items() if not k.startswith(("num_experts", "moe"))})


def _set_expert_adapters(model, seed=7):
  """Nonzero A and B on every expert adapter (and the attention's), so they change the logits."""
  from flax import nnx

  from qlora_jax.nn.moe import ExpertLoRA
  from tests.test_model_parity import _set_adapters

  _set_adapters(model)
  rng = np.random.default_rng(seed)
  for _, adapter in nnx.iter_modules(model):
    if isinstance(adapter, ExpertLoRA):
      for var in (adapter.lora_a, adapter.lora_b):
        var[...] = jnp.asarray(rng.standard_normal(var[...].shape) * 0.1, var[...].dtype)


@pytest.mark.skipif(not has("peft"), reason="needs peft")
@pytest.mark.parametrize("targets", [("q_proj", "experts.gate_up_proj", "experts.down_proj"), ("experts.down_proj",)])
def test_expert_adapters_export_to_peft_target_parameters(pair, tmp_path, targets):
  """LoRA on the experts' stacked products: PEFT loads our export (target_parameters, its
  nested wrappers' names) on the transformers model with our float32 logits, our import of it
  gives them back, and the merged export folds each expert's adapter into its weights."""
  import copy

  import peft
  import torch
  import transformers

  from qlora_jax.export import load_adapter, write_merged, write_peft
  from qlora_jax.train.config import DataConfig, ModelSetup, TrainConfig
  from tests.hf_reference import hf_logits, max_rel_error

  name, _, hf, folder = pair
  if name == "qwen3_moe_raw" or (name == "mixtral" and len(targets) == 1):
    pytest.skip("the adapters do not depend on the routing: qwen3_moe (both cases) and mixtral cover them")
  lora = q.LoraConfig(rank=4, alpha=8.0, targets=targets)
  ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(lora=lora, scan_layers=True), tokenizer=False)
  _set_expert_adapters(ours)
  out = tmp_path / "adapter"
  write_peft(TrainConfig(model=ModelSetup(model_dir=str(folder)), lora=lora, data=DataConfig(dataset="-")), ours, out)
  adapted = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
  ids = np.random.default_rng(5).integers(0, 160, (2, 16)).astype(np.int32)
  with torch.no_grad():
    ref = adapted(torch.from_numpy(ids).long()).logits.numpy()
  assert max_rel_error(hf_logits(hf, ids), ref) > 1e-2, "the adapters must change the logits"
  assert max_rel_error(ours(jnp.asarray(ids)), ref) <= 1e-4
  back, _ = load_adapter(folder, out, jnp.float32, tokenizer=False)
  assert max_rel_error(back(jnp.asarray(ids)), ref) <= 1e-4
  # The merged export against PEFT's own merge, tensor by tensor (logits would compare routing
  # decisions that bf16 weights can flip).
  write_merged(ours, folder, tmp_path / "merged")
  want = adapted.merge_and_unload().state_dict()
  got = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key].numpy(), value.numpy(), rtol=1e-2, atol=1e-2 * float(value.abs().max()),
                               err_msg=key)


def test_expert_adapters_train_under_remat_and_are_refused_where_they_cannot_apply(pair):
  """The experts' LoRA gets gradients in every layer and every expert that takes tokens, equal
  with full recomputation to none; expert targets on a dense model, or with dropout, are refused."""
  import jax
  from flax import nnx

  from qlora_jax.train.loss import batch_loss

  name, _, _, folder = pair
  if name != "mixtral":
    pytest.skip("one family is enough for the step")
  ids = jnp.asarray(np.random.default_rng(2).integers(1, 160, (2, 12)), jnp.int32)
  batch = dict(input_ids=ids, labels=jnp.roll(ids, -1, 1), positions=jnp.broadcast_to(jnp.arange(12), (2, 12)))
  lora = q.LoraConfig(rank=4, targets=("experts.gate_up_proj", "experts.down_proj"))
  grads = []
  for remat in ("none", "full"):
    model, _ = q.load_model(folder, jnp.float32, q.ModelOptions(lora=lora, remat=remat, scan_layers=True),
                            tokenizer=False)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.02, params)

    def loss(p, r):
      total, count = batch_loss(nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (p, r))), batch)
      return total / count

    grads.append(jax.jit(jax.grad(loss))(params, rest))
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  leaves = jax.tree.leaves(grads[0])
  assert len(leaves) == 4 and all(g.shape[:2] == (2, 4) for g in leaves)  # [layers, experts, ...]
  for g in leaves:
    assert np.all(np.abs(np.asarray(g)).reshape(2, 4, -1).max(-1) > 0), "a layer's expert got no gradient"
  with pytest.raises(ValueError, match="dropout"):
    q.load_model(folder, jnp.float32, q.ModelOptions(lora=q.LoraConfig(targets=lora.targets, dropout=0.1)),
                 tokenizer=False)
  from qlora_jax.nn.model import CausalLM
  from qlora_jax.nn.model_config import ModelConfig
  dense = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
  with pytest.raises(ValueError, match="mixture-of-experts"):
    CausalLM(dense, q.ModelOptions(lora=lora), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan", [False, True])
def test_router_aux_loss_matches_transformers(pair, scan):
  """router_aux_loss (the load-balancing loss of the last forward, every layer) equals
  transformers' aux_loss with output_router_logits; its gradient reaches the attention's
  adapters through the router probabilities, equal with full recomputation to none."""
  import jax
  import torch
  from flax import nnx

  from qlora_jax.nn.moe import router_aux_loss

  name, _, hf, folder = pair
  if name == "qwen3_moe_raw":
    pytest.skip("qwen3_moe and mixtral cover the loss")
  ids = np.random.default_rng(4).integers(0, 160, (2, 16)).astype(np.int32)
  with torch.no_grad():
    want = float(hf(torch.from_numpy(ids).long(), output_router_logits=True).aux_loss)
  ours, _ = q.load_model(folder, jnp.float32, q.ModelOptions(router_aux_loss=0.01, scan_layers=scan),
                         tokenizer=False)
  ours(jnp.asarray(ids))
  np.testing.assert_allclose(float(router_aux_loss(ours)), want, rtol=1e-5)
  if not scan:
    return
  grads = []
  for remat in ("none", "full"):
    options = q.ModelOptions(lora=q.LoraConfig(rank=4, targets=("q_proj",)), router_aux_loss=0.01,
                             remat=remat, scan_layers=True, attention="xla")
    model, _ = q.load_model(folder, jnp.float32, options, tokenizer=False)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05, params)

    def aux(p, r):
      m = nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (p, r)))
      m.hidden_states(jnp.asarray(ids))
      return router_aux_loss(m)

    grads.append(jax.tree.leaves(jax.jit(jax.grad(aux))(params, rest)))
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-9)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in grads[0])


EP_WORKER = """
import jax, numpy as np, optax
from flax import nnx
from qlora_jax.nn import moe
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.train.optimizer import clipped, init_optimizer
from qlora_jax.train.step import make_train_step, to_device_batch
from qlora_jax.testing import random_model

assert jax.device_count() == 8
calls = []
shard_experts = moe.on_experts
moe.on_experts = lambda *a, **k: calls.append(a[-1]) or shard_experts(*a, **k)
# 8 experts of 128 x 128: each expert's down_proj is 256 blocks, gate_up 512: one expert a shard
# is whole double-quant groups (256 blocks).
config = ModelConfig(model_type="qwen3_moe", vocab_size=256, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True)
options = ModelOptions(lora=LoraConfig(rank=4, targets=("q_proj", "experts.gate_up_proj", "experts.down_proj")),
                       remat="full", scan_layers=True, dtype="float32", attention="xla", router_aux_loss=0.01)
graphdef, lora0, rng0, frozen0 = nnx.split(random_model(config, options, seed=2), nnx.LoRAParam, nnx.RngState, ...)
lora0 = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), lora0)  # B != 0
ids = np.random.default_rng(0).integers(0, 256, (1, 8, 33)).astype(np.int32)
host = {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (1, 8, 32)).copy()}
tx = clipped(optax.sgd(1.0), 1e9)

def run(mesh):
  layout = None if mesh is None else make_layout(mesh)
  lora, rng = jax.tree.map(lambda x: x.copy(), (lora0, rng0))
  lora, rng, frozen = (lora, rng, frozen0) if layout is None else layout.put((lora, rng, frozen0))
  opt = init_optimizer(tx, lora, layout)
  step = make_train_step(graphdef, tx, None, layout, (lora, rng, opt, frozen))
  batch = to_device_batch(host) if layout is None else layout.put_batch(host, leading=1)
  lora, _, _, metrics = step(lora, rng, opt, frozen, batch)
  return (frozen, lora), jax.device_get(metrics), jax.device_get(lora)

_, ref_m, ref = run(None)
assert not calls
for mesh in [(("expert", 8),), (("data", 2), ("expert", 4))]:
  (frozen, stored), m, got = run(mesh)
  assert calls and calls[-1] == dict(mesh)["expert"], calls
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
  codes = frozen["model"]["layers"]["mlp"]["experts"]["down_proj"].get_raw_value().codes
  assert codes.sharding.spec == jax.sharding.PartitionSpec(None, "expert"), codes.sharding
  a = stored["model"]["layers"]["mlp"]["experts"]["down_lora"]["lora_a"].get_raw_value()
  assert a.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, None), a.sharding  # [L, E, in, r]
  print("equal", mesh, m["loss"], flush=True)
"""


def test_expert_parallel_step_equals_one_device():
  """With the experts split over the mesh's expert axis (8 simulated devices; expert 8, and
  data 2 x expert 4) each device keeps a quarter or an eighth of every layer's experts and
  computes only those: loss, gradient norm and the LoRA after one update (attention and
  expert adapters, router loss on) equal one device's in float32."""
  from tests.test_sharding import _on_devices

  out = _on_devices(8, EP_WORKER)
  assert out.count("equal (") == 2, out
