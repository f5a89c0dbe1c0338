"""Model options that need no reference library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.attention import attention_implementation
from qlora_jax.nn.model import ModelOptions
from tests.jaxprs import equations


def test_attention_auto_picks_cudnn_on_gpu_only_and_respects_explicit_choices():
  on_gpu = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert attention_implementation("auto", "bfloat16", 128) == on_gpu
  assert attention_implementation("auto", "float32", 128) == "xla"  # cuDNN's is 16-bit only
  assert attention_implementation("auto", "bfloat16", 320) == "xla"  # head_dim > 256
  assert attention_implementation("auto", "bfloat16", 100) == "xla"  # not a multiple of 8


def test_attention_auto_takes_cudnn_for_wide_heads_on_hopper_only(monkeypatch):
  """head_dim 256 (Gemma 3) goes to cuDNN on sm_90+, to XLA on earlier GPUs."""
  from qlora_jax.nn import attention

  class Gpu:
    def __init__(self, capability):
      self.compute_capability = capability

  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  for capability, wide in (("9.0", "cudnn"), ("8.0", "xla")):
    monkeypatch.setattr(attention.jax, "devices", lambda c=capability: [Gpu(c)])
    assert attention_implementation("auto", "bfloat16", 256) == wide
    assert attention_implementation("auto", "bfloat16", 128) == "cudnn"
  assert attention_implementation("cudnn", "float32", 64) == "cudnn"
  assert attention_implementation("xla", "bfloat16", 64) == "xla"


def test_softcapped_attention_falls_back_to_xla_saying_so_once(capfd):
  """Gemma 2's attention-logit softcap has no cuDNN kernel: asked for cuDNN, XLA runs, and one
  line says why, however many layers ask."""
  from qlora_jax.nn import attention

  attention.say_once.cache_clear()  # once per process: start this test's count afresh
  for _ in range(3):
    assert attention_implementation("cudnn", "bfloat16", 128, softcap=50.0) == "xla"
  err = capfd.readouterr().err
  assert err.count("cuDNN has no logit softcapping") == 1, err


@pytest.mark.parametrize("kw, match", [(dict(remat="sometimes"), "remat"), (dict(attention="flash"), "attention"),
                                       (dict(lora=LoraConfig(targets=("qkv",))), "lora_targets"),
                                       (dict(backend="xla"), "backend must be a")])
def test_bad_model_options(kw, match):
  with pytest.raises(ValueError, match=match):
    ModelOptions(**kw)


def test_sampling_greedy_temperature_and_top_p():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qlora_jax.nn.generate import sample_token

  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  assert int(sample_token(logits, key, 0.0, 1.0)[0]) == 0
  draws = np.asarray([int(sample_token(logits, k, 1.0, 1.0)[0]) for k in jax.random.split(key, 400)])
  assert set(draws) == {0, 1, 2, 3} and abs((draws == 0).mean() - 0.5) < 0.1
  # top_p = 0.75: the smallest set with >= 75% of the mass is {0, 1} (0.5 + 0.3).
  nucleus = {int(sample_token(logits, k, 1.0, 0.75)[0]) for k in jax.random.split(key, 200)}
  assert nucleus == {0, 1}


def test_float32_models_ask_for_float32_products():
  """With dtype float32, every product of the training loss (base, LoRA, attention, lm_head; forward
  and backward, through the custom VJP, remat and scan) asks for full float32 precision, which a
  GPU would otherwise run in TF32; a bf16 model leaves the default."""
  import jax.numpy as jnp
  from flax import nnx

  from qlora_jax.nn.lora import LoraConfig
  from qlora_jax.train.loss import batch_loss
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  ids = jnp.zeros((2, 8), jnp.int32)
  batch = dict(input_ids=ids, labels=ids, positions=jnp.broadcast_to(jnp.arange(8), (2, 8)),
               segment_ids=jnp.ones_like(ids))
  highest = (jax.lax.Precision.HIGHEST,) * 2
  for dtype in ("float32", "bfloat16"):
    options = ModelOptions(dtype=dtype, lora=LoraConfig(rank=4), remat="full", scan_layers=True)
    graphdef, lora, rest = nnx.split(random_model(config, options), nnx.LoRAParam, ...)
    def loss(lora_, rest_):  # Variables rebuilt at this trace level, as train_step does
      model = nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (lora_, rest_)))
      return batch_loss(model, batch)[0]

    with jax.default_matmul_precision(None):  # tests/conftest.py sets "highest" on a GPU
      traced = jax.make_jaxpr(jax.grad(loss))(lora, rest)
    precisions = [eqn.params["precision"] for eqn in equations(traced)
                  if eqn.primitive.name == "dot_general"]
    assert len(precisions) >= 7 * 2 * 3 + 2  # 7 base products a layer, LoRA's, attention's, the head
    assert all(p == highest for p in precisions) == (dtype == "float32"), (dtype, set(precisions))
    assert any(p == highest for p in precisions) == (dtype == "float32")


def _tiny_loss_and_grads(remat: str, window=None, segments: bool = False, jaxpr: bool = False,
                         mlp_chunk: int = 0, flops: list | None = None, scan_unroll: int = 1, layers: int = 2,
                         dropout: float = 0.0, loss_chunk: int = 0):
  """(loss, LoRA gradients, the gradient's jaxpr text if asked) of a tiny float32 model on
  right-padded rows; `flops` (a list) gets the compiled gradient's FLOP count appended."""
  import jax.numpy as jnp
  from flax import nnx

  from qlora_jax.data.formats import IGNORE
  from qlora_jax.nn.lora import LoraConfig
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model
  from qlora_jax.train.loss import batch_loss

  config = ModelConfig(model_type="mistral" if window else "llama", vocab_size=128, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, sliding_window=window)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 24)), jnp.int32)
  real = jnp.arange(24)[None, :] < jnp.asarray([[24], [17]])  # the second row: 7 padding tokens
  batch = dict(input_ids=jnp.where(real, ids, 0), labels=jnp.where(real, jnp.roll(ids, -1, 1), IGNORE),
               positions=jnp.broadcast_to(jnp.arange(24), (2, 24)) * real)
  if segments:  # the masked path: one segment a row, padding segment 0
    batch["segment_ids"] = real.astype(jnp.int32)
  options = ModelOptions(dtype="float32", lora=LoraConfig(rank=4, dropout=dropout), remat=remat, scan_layers=True,
                         attention="xla", mlp_chunk=mlp_chunk, scan_unroll=scan_unroll,
                         loss_chunk=loss_chunk)
  model = random_model(config, options, seed=3)
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0: the adapters act

  def loss(lora_, rest_):
    merged = nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (lora_, rest_)))
    total, count = batch_loss(merged, batch)
    return total / count

  step = jax.jit(jax.value_and_grad(loss))
  value, grads = step(lora, rest)
  if flops is not None:
    cost = step.lower(lora, rest).compile().cost_analysis()
    flops.append((cost[0] if isinstance(cost, list) else cost)["flops"])
  text = str(jax.make_jaxpr(jax.grad(loss))(lora, rest)) if jaxpr else ""
  return float(value), jax.tree.leaves(grads), text


@pytest.mark.parametrize("window", [None, 5])
def test_causal_path_equals_the_masked_path_on_right_padded_rows(window):
  """Rows without segment ids take causal attention with no [T, T] mask: loss and LoRA
  gradients equal the explicitly masked path's (float32, sliding window too)."""
  causal, g_causal, _ = _tiny_loss_and_grads("full", window)
  masked, g_masked, _ = _tiny_loss_and_grads("full", window, segments=True)
  np.testing.assert_allclose(causal, masked, rtol=1e-6)
  for a, b in zip(g_causal, g_masked):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_offloaded_layer_inputs_equal_full_remat_and_live_in_host_memory():
  """remat="offload" computes what "full" does, bit for bit, and its saved layer inputs
  ([L, B, T, D] under the scan) are put in pinned host memory."""
  full, g_full, full_jaxpr = _tiny_loss_and_grads("full", jaxpr=True)
  offload, g_offload, jaxpr = _tiny_loss_and_grads("offload", jaxpr=True)
  assert offload == full
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(g_full, g_offload))
  assert "f32<host>[2,24,64]" in jaxpr, "the layer input is not offloaded"
  assert "<host>" not in full_jaxpr


def test_offloaded_attention_residuals_skip_the_attention_recomputation():
  """remat="offload_attention" keeps the attention's output and statistics in pinned host
  memory beside the layer inputs: equal loss and gradients, and the compiled gradient does
  fewer FLOPs than "offload" (the attention's forward is not run again in the backward)."""
  flops = []
  offload, g_offload, _ = _tiny_loss_and_grads("offload", flops=flops)
  kept, g_kept, jaxpr = _tiny_loss_and_grads("offload_attention", jaxpr=True, flops=flops)
  np.testing.assert_allclose(kept, offload, rtol=1e-6)
  for a, b in zip(g_kept, g_offload):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert "f32<host>[2,24,64]" in jaxpr, "the layer input is not offloaded"
  assert "f32<host>[2,24,4,16]" in jaxpr, "the attention output is not offloaded"
  assert flops[1] < flops[0], flops


@pytest.mark.parametrize("remat", ["full", "offload"])
def test_chunked_mlp_equals_the_whole_mlp_without_extra_recomputation(remat):
  """mlp_chunk=10 runs the 48 tokens' MLP in 5 scanned pieces (the last one padded), each recomputed on
  its own in the backward pass: the loss and LoRA gradients equal the unchunked model's, and
  the compiled gradient does no more FLOPs (the layer's recomputation does not run the MLP a
  third time)."""
  flops = []
  whole, g_whole, _ = _tiny_loss_and_grads(remat, flops=flops)
  chunked, g_chunked, _ = _tiny_loss_and_grads(remat, mlp_chunk=10, flops=flops)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  for a, b in zip(g_chunked, g_whole):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert flops[1] <= flops[0] * 1.001, flops


def test_unrolled_layer_scan_equals_the_plain_scan():
  """scan_unroll=2 over 3 layers (one iteration of two, one left over) computes what the plain
  scan does: loss and LoRA gradients, with offloaded checkpoints."""
  plain, g_plain, _ = _tiny_loss_and_grads("offload", layers=3)
  unrolled, g_unrolled, _ = _tiny_loss_and_grads("offload", layers=3, scan_unroll=2)
  np.testing.assert_allclose(unrolled, plain, rtol=1e-6)
  for a, b in zip(g_unrolled, g_plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="scan_unroll"):
    ModelOptions(scan_unroll=0)


def test_mlp_chunk_must_be_a_non_negative_int():
  with pytest.raises(ValueError, match="mlp_chunk"):
    ModelOptions(mlp_chunk=-1)


def test_loss_chunk_option_sets_the_loss_pieces():
  """ModelOptions.loss_chunk reaches the chunked loss: 48 tokens in pieces of 16 (a scan of 3)
  give the default single piece's loss and LoRA gradients."""
  whole, g_whole, jaxpr_whole = _tiny_loss_and_grads("full", jaxpr=True)
  pieces, g_pieces, jaxpr = _tiny_loss_and_grads("full", jaxpr=True, loss_chunk=16)
  np.testing.assert_allclose(pieces, whole, rtol=1e-6)
  for a, b in zip(g_pieces, g_whole):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert "f32[3,16,64]" in jaxpr and "f32[3,16,64]" not in jaxpr_whole
  with pytest.raises(ValueError, match="loss_chunk"):
    ModelOptions(loss_chunk=-1)


def test_embedding_in_host_memory_trains_as_on_the_device():
  """build(host_embedding=True) keeps the table off the devices (a [0, D] stand-in), looks the
  rows up in put_batch, and trains to the same losses as the table on the device; model() puts
  the table back for inference; a tied model is refused."""
  import dataclasses

  import jax.numpy as jnp

  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model
  from qlora_jax.train.builder import build
  from qlora_jax.train.config import OptimConfig

  config = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  options = ModelOptions(dtype="float32", lora=LoraConfig(rank=4), remat="full", scan_layers=True)
  optim = OptimConfig(steps=10, warmup_ratio=0.0)
  ids = np.random.default_rng(1).integers(0, 96, (1, 2, 17)).astype(np.int32)
  batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 2, 16)).copy()}
  losses, logits = {}, {}
  for host in (False, True):
    t = build(random_model(config, options, seed=4), optim, host_embedding=host)
    assert (t.frozen["model"]["embed_tokens"]["weight"].shape[0] == 0) == host
    losses[host] = [float(t.train_step(t.put_batch(batch))["loss"]) for _ in range(3)]
    logits[host] = np.asarray(t.model()(jnp.asarray(ids[0, :, :-1])))
  assert losses[True] == losses[False]
  np.testing.assert_array_equal(logits[True], logits[False])
  tied = dataclasses.replace(config, tie_word_embeddings=True)
  with pytest.raises(ValueError, match="untied lm_head"):
    build(random_model(tied, options, seed=4), optim, host_embedding=True)


def test_chunked_mlp_holds_one_piece_of_the_mlp_at_a_time():
  """With a wide MLP (intermediate 2048 against hidden 64) the backward's [tokens, intermediate]
  tensors dominate the step's temporaries; in pieces of 128 of the 1024 tokens XLA's buffer
  assignment needs less than half the temporary memory of the whole-batch MLP."""
  import jax.numpy as jnp
  from flax import nnx

  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=2048,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 512)), jnp.int32)
  temp = {}
  for chunk in (0, 128):
    options = ModelOptions(dtype="float32", lora=LoraConfig(rank=4), remat="full", scan_layers=True,
                           mlp_chunk=chunk, attention="xla")
    graphdef, lora, rest = nnx.split(random_model(config, options, seed=1), nnx.LoRAParam, ...)

    def loss(lora_, rest_):
      model = nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (lora_, rest_)))
      return jnp.sum(model.hidden_states(ids) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(lora, rest).compile()
    temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[128] < 0.5 * temp[0], temp


def test_generation_stays_inside_the_context():
  """A prompt that fills the model's context is refused in one line (it used to run a prefill of
  any length); a shorter one generates only up to the context."""
  from qlora_jax.nn.generate import SamplingConfig, generate
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=32)
  model = random_model(config, ModelOptions(dtype="float32"), seed=0)
  with pytest.raises(ValueError, match="the prompt has 40 tokens, the model's context 32"):
    list(generate(model, [list(range(1, 41))], SamplingConfig(max_new_tokens=4)))
  tokens = list(generate(model, [list(range(1, 29))], SamplingConfig(max_new_tokens=20)))
  assert len(tokens) == 4


def test_chunks_are_dispatched_a_chunk_ahead_with_the_same_tokens():
  """run_chunks (generate's loop after its prefill) dispatches chunk k + 1 before reading chunk
  k back, and yields the tokens a loop that reads each chunk back first yields (sampled, so the
  keys' order counts)."""
  import jax
  import jax.numpy as jnp

  from qlora_jax.nn.generate import CHUNK, _decoder, decode_state, run_chunks
  from qlora_jax.nn.kv_cache import KVCache
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  model = random_model(config, ModelOptions(dtype="float32"), seed=0)
  graphdef, state = decode_state(model)
  _, chunk = _decoder(graphdef, 1.0, 1.0)
  empty = KVCache.empty(config, 2, 4 * CHUNK, jnp.float32)
  token, key = jnp.asarray([3, 5], jnp.int32), jax.random.key(1)
  want, cache, tok, k = [], jax.tree.map(jnp.copy, empty), token, key
  for _ in range(3):
    k, sub = jax.random.split(k)
    tokens, cache = chunk(state, tok, cache, sub)
    tok = tokens[:, -1]
    want.append(np.asarray(tokens))
  got = list(run_chunks(chunk, state, token, jax.tree.map(jnp.copy, empty), key, 3))
  np.testing.assert_array_equal(np.stack(got), np.stack(want))
  assert len({a.tobytes() for a in want}) == 3  # three different chunks

  events = []

  class Tokens:  # a chunk's result that records when it is read back
    def __init__(self, i):
      self.i = i

    def __getitem__(self, index):
      return self

    def __array__(self, dtype=None, copy=None):
      events.append(("read", self.i))
      return np.zeros((2, CHUNK), np.int32)

  def recording(state, token, cache, key):
    events.append(("dispatch", sum(e[0] == "dispatch" for e in events)))
    return Tokens(events[-1][1]), cache

  later = run_chunks(recording, None, token, None, key, 3)
  assert events == [("dispatch", 0)]  # before anything is read back (generate: the prefill's token)
  assert len(list(later)) == 3
  assert events == [("dispatch", 0), ("dispatch", 1), ("read", 0), ("dispatch", 2), ("read", 1), ("read", 2)]


def test_softcapped_attention_without_a_mask_keeps_the_window():
  """The causal (mask-free) call of the softcapped attention applies the sliding window as the
  explicit mask does."""
  import jax.numpy as jnp

  from qlora_jax.nn.attention import attend, make_mask

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 9, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
  slots = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mask = make_mask(slots, slots, jnp.ones((2, 9), bool), window=3)
  kw = dict(implementation="xla", scale=0.3, softcap=2.0)
  np.testing.assert_allclose(attend(q, k, v, None, window=3, **kw), attend(q, k, v, mask, **kw), rtol=1e-6)
  assert not np.allclose(attend(q, k, v, None, **kw), attend(q, k, v, mask, **kw))


@pytest.mark.parametrize("cls, hf", [
    ("Gemma2Config", dict(model_type="gemma2", num_hidden_layers=5, sliding_window=4096)),
    ("Gemma3TextConfig", dict(model_type="gemma3_text", num_hidden_layers=7, sliding_window=512,
                              sliding_window_pattern=3)),
    ("Gemma3TextConfig", dict(model_type="gemma3_text", num_hidden_layers=7, sliding_window=512)),
])
def test_gemma_configs_without_layer_types_read_as_transformers_reads_them(cls, hf):
  """Hub configs written before layer_types (and ones omitting tie_word_embeddings, whose class
  default is True): the layer kinds and tying come out as transformers' own config class makes
  them."""
  transformers = pytest.importorskip("transformers")
  from qlora_jax.nn.model_config import ModelConfig

  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, **hf)
  ref = getattr(transformers, cls)(**{k: v for k, v in base.items() if k != "model_type"})
  ours = ModelConfig.from_hf(base)
  assert ours.local_layers == tuple(t == "sliding_attention" for t in ref.layer_types)
  assert ours.tie_word_embeddings == ref.tie_word_embeddings is True
  all_full = ModelConfig.from_hf({**base, "layer_types": ["full_attention"] * hf["num_hidden_layers"]})
  assert all_full.sliding_window is None and all_full.layer_types == ()


@pytest.mark.parametrize("masked, window", [(False, None), (False, 5), (True, None)])
def test_softcapped_attention_in_query_pieces_equals_it_whole(masked, window):
  """Gemma 2's softcapped attention over rows longer than its query chunk: the same output and
  gradients as in one piece (13 queries in pieces of 4, the last padded), and the compiled
  backward's temporaries at 512 queries well under the whole-row form's."""
  import jax.numpy as jnp

  from qlora_jax.nn.attention import _softcapped, make_mask

  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 13, 4, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid = jnp.asarray(np.arange(t)[None] < np.array([[t], [9]]))  # the second row right-padded
  mask = make_mask(slots, slots, valid, window=3) if masked else None

  def loss(chunk):
    return lambda q, k, v: jnp.sum(jnp.sin(_softcapped(q, k, v, mask, 0.3, 1.0, window, chunk=chunk)))
  whole, pieces = (jax.value_and_grad(loss(c), argnums=(0, 1, 2))(q, k, v) for c in (64, 4))
  np.testing.assert_allclose(pieces[0], whole[0], rtol=1e-5)
  for a, w in zip(pieces[1], whole[1], strict=True):
    np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-6)

  if not masked and window is None:  # memory: [B, N, 64, S] float32 scores at a time, not [B, N, T, S]
    x = jax.ShapeDtypeStruct((1, 512, 4, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((1, 512, 2, 16), jnp.float32)
    temp = {c: jax.jit(jax.grad(loss(c), argnums=(0, 1, 2))).lower(x, y, y).compile()
            .memory_analysis().temp_size_in_bytes for c in (512, 64)}
    assert temp[64] * 3 < temp[512], temp


def test_generation_reads_16_bit_copies_of_float32_adapters_with_the_same_numbers():
  """decode_state: a bf16 model's float32 LoRA weights reach generation as bf16 copies, which its
  products round them to anyway, with the power-of-two scaling (16 / 4) carried in A's copy: the
  same logits, bit for bit; generate() picks the same tokens as greedy decoding of the model
  itself; the model keeps its float32 weights and scales its updates itself. A scaling that is
  no power of two stays a multiply."""
  from qlora_jax.nn.generate import SamplingConfig, decode_state, generate
  from qlora_jax.nn.kv_cache import KVCache
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128)
  model = random_model(config, ModelOptions(dtype="bfloat16", lora=LoraConfig(rank=4)), seed=0)
  for i, (path, b) in enumerate(nnx.iter_graph(model)):
    if path and path[-1] == "lora_b":
      b[...] = jax.random.normal(jax.random.key(i), b.shape) * 0.5
  model.eval()
  graphdef, state = decode_state(model)
  lora = [v for _, v in nnx.to_flat_state(state) if isinstance(v, nnx.LoRAParam)]
  assert lora and all(v[...].dtype == jnp.bfloat16 for v in lora)
  assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  copy = nnx.merge(graphdef, state)
  layer, copied = model.model.layers[0].self_attn.q_proj, copy.model.layers[0].self_attn.q_proj
  assert not layer.scaling_in_a and copied.scaling_in_a and copied.update_scale == 1.0
  np.testing.assert_array_equal(np.asarray(copied.lora_a[...], np.float32),
                                np.asarray((layer.lora_a[...] * 4.0).astype(jnp.bfloat16), np.float32))
  odd = random_model(config, ModelOptions(dtype="bfloat16", lora=LoraConfig(rank=4, alpha=6.0)))
  assert not nnx.merge(*decode_state(odd)).model.layers[0].self_attn.q_proj.scaling_in_a

  prompt = [5, 9, 2, 33, 17]
  ids = jnp.asarray([prompt], jnp.int32)

  def first_logits(m):
    return m.decode(ids, KVCache.empty(config, 1, 16, jnp.bfloat16))[0]
  np.testing.assert_array_equal(np.asarray(first_logits(nnx.merge(graphdef, state)), np.float32),
                                np.asarray(first_logits(model), np.float32))

  tokens = [int(t[0]) for t in generate(model, [prompt], SamplingConfig(max_new_tokens=6))]
  cache, reference, step = KVCache.empty(config, 1, 16, jnp.bfloat16), [], ids
  for _ in range(6):
    logits, cache = model.decode(step, cache)
    reference.append(int(jnp.argmax(logits[0, -1])))
    step = jnp.asarray([[reference[-1]]], jnp.int32)
  assert tokens == reference


@pytest.mark.parametrize("scan_layers,dtype", [(False, "bfloat16"), (True, "bfloat16"), (True, "float32")])
def test_decoding_writes_the_kv_cache_in_place(scan_layers, dtype):
  """A compiled chunk of decoding steps neither copies, converts nor re-stacks the whole
  [L, B, S, KV, H] cache: each layer writes its new keys and values into it in place (before, the
  unrolled model sliced each layer's cache and re-stacked all of them, the scanned one rewrote it
  through the scan's outputs, and XLA:CPU computed a bf16 update in float32, converting the whole
  cache at every write; the tokens are checked by the generation tests). Unrolled, the cache is
  one array a layer, and no layer's is copied either."""
  from qlora_jax.nn.generate import greedy_chunk
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=512)
  model = random_model(config, ModelOptions(dtype=dtype, scan_layers=scan_layers), seed=1)
  model.eval()
  chunk, args = greedy_chunk(model, 2, 384)  # batch 2: no unit axis XLA could drop from a copy
  assert isinstance(args[2].k, tuple) != scan_layers  # unrolled: one cache array a layer
  hlo = chunk.lower(*args).compile().as_text()
  # instructions making a whole cache: copies, conversions, concatenations (op or fusion); of a
  # layer's array copies and concatenations (XLA:CPU's attention reads it converted to float32)
  kinds = {f"[{config.num_hidden_layers},2,384,2,16]": ("copy", "concatenate", "convert"),
           "[2,384,2,16]": ("copy", "concatenate")}
  moves = []
  for line in hlo.splitlines():
    name, _, rhs = line.strip().partition(" = ")
    shape = rhs.split("{")[0].split(" ")[0]
    shape = shape[shape.find("["):]
    if any(w in name or f" {w}(" in rhs for w in kinds.get(shape, ())):
      moves.append(line.strip()[:160])
  assert not moves, moves[:3]


def test_a_per_layer_kv_cache_decodes_as_the_stacked_one():
  """Unrolled layers decode the same logits from a cache of one array a layer (what generation
  makes them: CausalLM.empty_cache) as from the stacked [L, B, S, KV, H] one; the layer scan
  refuses a per-layer cache with a line saying what to make instead."""
  import jax.numpy as jnp

  from qlora_jax.nn.kv_cache import KVCache
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128)
  model = random_model(config, ModelOptions(dtype="bfloat16"), seed=2)
  model.eval()
  per_layer = model.empty_cache(2, 24)
  assert isinstance(per_layer.k, tuple) and len(per_layer.k) == 3 and per_layer.k[0].shape == (2, 24, 2, 16)
  caches = {"per layer": per_layer, "stacked": KVCache.empty(config, 2, 24, jnp.bfloat16)}
  ids = jnp.asarray([[0, 5, 9, 2, 33, 17], [4, 8, 15, 16, 23, 42]], jnp.int32)
  mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1] * 6], jnp.int32)  # the first row left-padded
  out = {}
  for name, cache in caches.items():
    logits, cache = model.decode(ids, cache, mask)
    steps = [logits]
    for t in range(3):
      logits, cache = model.decode(jnp.asarray([[7 + t], [11 + t]], jnp.int32), cache)
      steps.append(logits)
    out[name] = np.concatenate([np.asarray(s, np.float32) for s in steps], axis=1)
  assert np.isfinite(out["stacked"]).all()
  np.testing.assert_array_equal(out["per layer"], out["stacked"])

  scanned = random_model(config, ModelOptions(dtype="bfloat16", scan_layers=True), seed=2)
  assert not isinstance(scanned.empty_cache(1, 8).k, tuple)
  with pytest.raises(ValueError, match="per-layer KV cache for scanned layers"):
    scanned.decode(ids[:1], per_layer)
