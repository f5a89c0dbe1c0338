"""transformers (torch, float32) models as the reference; imported only where torch exists."""

import pathlib

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import qlora_jax as q

FAMILIES = {
    # Llama 3.1-style rope scaling, untied, GQA 4, intermediate not a multiple of 64.
    "llama": dict(cls="LlamaConfig", hidden_size=128, intermediate_size=200, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    # Llama 3.2: llama3 rope scaling with tied embeddings, GQA 3.
    "llama3.2": dict(cls="LlamaConfig", hidden_size=96, intermediate_size=176, num_attention_heads=6,
                     num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8}),
    # Mistral: no GQA (ratio 1), tied embeddings, a sliding window shorter than the sequence.
    "mistral": dict(cls="MistralConfig", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                    num_key_value_heads=4, tie_word_embeddings=True, sliding_window=6),
    # Qwen2: q/k/v biases, GQA 3.
    "qwen2": dict(cls="Qwen2Config", hidden_size=192, intermediate_size=320, num_attention_heads=6,
                  num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen3: q/k RMSNorm per head before RoPE, head_dim (40) independent of hidden / heads (24).
    "qwen3": dict(cls="Qwen3Config", hidden_size=96, intermediate_size=200, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=40, tie_word_embeddings=True),
    # Gemma 2: (1 + w) norms, sandwich norms, GeGLU, scaled embeddings, attention and final
    # softcaps, query_pre_attn_scalar != head_dim, sliding window on alternate layers, tied.
    "gemma2": dict(cls="Gemma2Config", hidden_size=96, intermediate_size=176, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
                   attn_logit_softcapping=1.0, final_logit_softcapping=0.5, tie_word_embeddings=True),
    # Gemma 3 (text): q/k norms, a sliding layer then a full one with their own rope (the full
    # one linearly scaled), no softcaps, GQA 4.
    "gemma3": dict(cls="Gemma3TextConfig", hidden_size=96, intermediate_size=176, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=32, sliding_window=5, query_pre_attn_scalar=32,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1000000.0}}),
    # Phi-3: fused qkv_proj and gate_up_proj, a sliding window (Phi-3-mini's 2047, here 7).
    "phi3": dict(cls="Phi3Config", hidden_size=96, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=7, tie_word_embeddings=False, pad_token_id=0),
    # Phi-4-mini: fused as Phi-3, partial rotary factor 0.75 (18 of 24 dimensions), tied, GQA 3.
    "phi4mini": dict(cls="Phi3Config", hidden_size=144, intermediate_size=176, num_attention_heads=6,
                     num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.75}),
    # Phi-3.5 / Phi-4-mini's longrope: short and long per-frequency factors (long past the
    # original 32 positions), attention factor from 64 / 32, with a partial rotary factor.
    "phi3.5": dict(cls="Phi3Config", hidden_size=96, intermediate_size=176, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
                   original_max_position_embeddings=32,
                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
}


def tiny_hf_model(family: str, seed: int = 0, layers: int = 2, vocab: int = 160):
  """A random float32 transformers model of the family."""
  spec = dict(FAMILIES[family])
  cfg = getattr(transformers, spec.pop("cls"))(vocab_size=vocab, num_hidden_layers=layers,
                                               max_position_embeddings=64, **spec)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
  with torch.no_grad():  # biases and norms are zeros/ones at init: make them matter
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


def save(model, folder: pathlib.Path) -> pathlib.Path:
  model.save_pretrained(str(folder))
  return folder


def converted(hf_model, tmp: pathlib.Path):
  """(our float32 model of hf_model's checkpoint converted to 4 bits, the converted folder), and
  hf_model given our dequantized weights: both compute with the same numbers."""
  from qlora_jax.io.convert import convert

  convert(str(save(hf_model, tmp / "src")), tmp / "out", dense_dtype="float32", progress=False)
  ours, _ = q.load_model(tmp / "out", jnp.float32, tokenizer=False)
  load_ours_into_torch(ours, hf_model)
  return ours, tmp / "out"


def load_ours_into_torch(ours: q.CausalLM, hf_model) -> None:
  """Replace hf_model's 4-bit-able weights (linear layers, experts) by our dequantized ones, and
  its dense weights by ours."""
  from flax import nnx

  from qlora_jax.nn.families import FUSED, fused_parts

  state = hf_model.state_dict()
  for path, var in nnx.to_flat_state(nnx.state(ours, q.QuantWeight)):  # linear layers and experts
    name = ".".join(str(p) for p in path)
    state[name] = torch.from_numpy(np.asarray(q.dequantize(var.get_value(), jnp.float32)))
  for name in list(state):  # a fused layer (Phi-3) takes its parts' rows in order
    found = fused_parts(name)
    if found is not None:
      prefix, group = found
      state[name] = torch.cat([state.pop(f"{prefix}{part}.weight") for part in FUSED[group]])
  for path, var in nnx.to_flat_state(nnx.state(ours, q.FrozenParam)):
    name = ".".join(str(p) for p in path)
    state[name] = torch.from_numpy(np.asarray(var.get_value(), np.float32))
  if hf_model.config.tie_word_embeddings:
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
  hf_model.load_state_dict(state)


def hf_logits(hf_model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    return hf_model(torch.from_numpy(ids).long(), **kw).logits.float().numpy()


def assert_greedy_matches(ours, hf_model, max_new_tokens: int = 20, seed: int = 4) -> None:
  """Our generate() on two left-padded prompts equals transformers' greedy generate of each."""
  from qlora_jax.nn.generate import SamplingConfig, generate

  rng = np.random.default_rng(seed)
  prompts = [rng.integers(1, 160, 9).tolist(), rng.integers(1, 160, 4).tolist()]
  got = np.stack(list(generate(ours, prompts, SamplingConfig(max_new_tokens=max_new_tokens))), axis=1)
  for tokens, prompt in zip(got, prompts):
    with torch.no_grad():
      want = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(tokens, want[0, len(prompt):].numpy())


def max_rel_error(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def bnb_exact_cpu_path(model) -> None:
  """Make bitsandbytes' Linear4bit use its float32 dequantize + matmul path on the CPU.

  On CPUs with AVX512-BF16, bnb 0.50 repacks 4-bit weights at the first inference forward for
  a bf16 kernel, whose error (~3e-3 relative) would hide float32-level differences.
  """
  for module in model.modules():
    if hasattr(module, "support_avx512bf16_for_cpu"):
      module.support_avx512bf16_for_cpu = False
