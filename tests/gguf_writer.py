"""A transformers model written as a GGUF file the way llama.cpp's converter (convert_hf_to_gguf.py)
writes its family: gguf-py's tensor names for the architecture, Q and K head-permuted for
"llama", Gemma's RMSNorm weights stored plus one, Phi-3's fused projections kept fused, float32
tensors, the hyperparameters under llama.cpp's keys. No tokenizer: the tests give ids."""

from __future__ import annotations

import pathlib

import numpy as np


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's rotary permutation of a Q or K projection (LlamaModel.permute)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: pathlib.Path, arch: str) -> pathlib.Path:
  import gguf

  cfg = model.config
  heads, kv_heads, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
  rope = dict(cfg.rope_parameters)
  if "full_attention" in rope:  # Gemma 3: the global layers' rope is the file's
    rope = dict(rope["full_attention"])
  gemma = arch.startswith("gemma")

  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_freq_base(rope["rope_theta"])
  w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
  if getattr(cfg, "sliding_window", None):
    w.add_sliding_window(cfg.sliding_window)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
  if rope.get("rope_type") == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope["factor"])

  arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  names = gguf.get_tensor_name_map(arch_id, layers)
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    base, suffix = name.rsplit(".", 1)
    stored = names.get_name(base)
    assert stored is not None, f"gguf-py has no {arch} name for {name}"
    data = tensor.detach().numpy().astype(np.float32)
    if arch == "llama" and suffix == "weight" and base.endswith(("q_proj", "k_proj")):
      data = _permute(data, heads if base.endswith("q_proj") else kv_heads)
    if gemma and name.endswith("norm.weight"):
      data = data + 1.0
    w.add_tensor(f"{stored}.{suffix}", data)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
