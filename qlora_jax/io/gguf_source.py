"""Reading a GGUF file (llama.cpp's format) as a transformers checkpoint of its family.

The tensor names come from gguf-py's own name map for the file's architecture (the inverse of
what llama.cpp's converter writes), asked for the transformers names the family's checkpoints
have. What llama.cpp changes on the way is undone here: Q and K of "llama" files are stored
head-permuted, and Gemma files store each RMSNorm weight plus one (llama.cpp's norm does not
add it). The config is rebuilt from the file's metadata; where llama.cpp fixes a value in its
code instead of writing it (Gemma's local rope base, its query scale), the same value is used.
"""

from __future__ import annotations

import pathlib

import numpy as np

from qlora_jax.nn.families import FUSED_INTO, LINEAR_NAMES, Family, gguf_family

# Gemma models llama.cpp calls 27B (by layer count) scale queries by hidden / heads, the rest by
# head_dim: transformers' query_pre_attn_scalar, which GGUF files do not carry.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's fixed base of Gemma 3's sliding-window layers


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def hf_module_names(fam: Family, layers: int) -> list[str]:
  """The transformers module names (no .weight / .bias) of a family's checkpoint."""
  per_layer = ["input_layernorm", "post_attention_layernorm"]
  if fam.sandwich_norms:
    per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  if fam.qk_norm:
    per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
  for name in LINEAR_NAMES:
    module = ("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.")
    stored = FUSED_INTO.get(name, name) if fam.fused else name
    if module + stored not in per_layer:
      per_layer.append(module + stored)
  return (["model.embed_tokens", "model.norm", "lm_head"] +
          [f"model.layers.{i}.{n}" for i in range(layers) for n in per_layer])


def gguf_to_hf_names(arch: str, fam: Family, layers: int) -> dict[str, str]:
  """GGUF tensor name (no suffix) -> transformers name, from gguf-py's map for `arch`."""
  import gguf

  arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  name_map = gguf.get_tensor_name_map(arch_id, layers)
  table = {}
  for hf in hf_module_names(fam, layers):
    stored = name_map.get_name(hf)
    if stored is not None:
      table[stored] = hf
  return table


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's rotary permutation of a Q or K projection ([heads * head_dim, ...])."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(reader, arch: str, fam: Family, tensor_names: set[str]) -> dict:
  g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
  scaling = g("rope.scaling.type")
  gemma = fam.norm_plus_one
  if (scaling not in (None, "none") and not (fam.layer_rope and scaling == "linear")) or any(
      n in tensor_names for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")):
    raise ValueError(f"this GGUF's rope scaling ({scaling or 'per-frequency factors'}) is not read from "
                     "GGUF; convert the transformers folder of this model instead")
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  layers = int(g("block_count"))
  head_dim = int(g("attention.key_length") or hidden // heads)
  vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
  rope = {"rope_type": "default", "rope_theta": float(g("rope.freq_base", 10000.0))}
  from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
  config = {
      "model_type": fam.model_type, "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[fam.model_type]],
      "torch_dtype": "bfloat16", "vocab_size": int(vocab), "hidden_size": hidden,
      "intermediate_size": int(g("feed_forward_length")), "num_hidden_layers": layers,
      "num_attention_heads": heads, "num_key_value_heads": int(g("attention.head_count_kv", heads)),
      "head_dim": head_dim, "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_parameters": rope, "max_position_embeddings": int(g("context_length", 4096)),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
  }
  rotary = g("rope.dimension_count")
  if rotary and int(rotary) != head_dim:
    rope["partial_rotary_factor"] = int(rotary) / head_dim
  if g("attention.sliding_window"):
    config["sliding_window"] = int(g("attention.sliding_window"))
  if gemma:
    config["attn_logit_softcapping"] = g("attn_logit_softcapping")
    config["final_logit_softcapping"] = g("final_logit_softcapping")
    config["query_pre_attn_scalar"] = hidden // heads if layers == GEMMA_27B_LAYERS.get(arch) else head_dim
    pattern = g("attention.sliding_window_pattern", fam.layer_pattern)
    config["layer_types"] = [
        "sliding_attention" if (pattern[i] if isinstance(pattern, list) else (i + 1) % int(pattern)) else "full_attention"
        for i in range(layers)]
  if fam.layer_rope:
    if scaling == "linear":
      rope.update(rope_type="linear", factor=float(g("rope.scaling.factor")))
    config["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
        "rope_type": "default", "rope_theta": GEMMA_LOCAL_ROPE_BASE}}
  return config


def read_gguf(path: pathlib.Path) -> tuple:
  """(transformers config, tensors(), tensor count, save_tokenizer) of a GGUF file."""
  import gguf

  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:
    raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
  arch = _field(reader, "general.architecture")
  fam = gguf_family(arch)
  names = {t.name for t in reader.tensors}
  config = _config(reader, arch, fam, names)
  table = gguf_to_hf_names(arch, fam, config["num_hidden_layers"])
  heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

  def hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base not in table:
      raise ValueError(f"GGUF tensor {name!r} has no transformers equivalent in the {fam.model_type} family")
    return f"{table[base]}.{suffix}"

  def load(tensor, name):
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    proj = name.split(".")[-2]
    if arch == "llama" and proj in heads and name.endswith(".weight"):
      w = unpermute_qk(w, heads[proj])
    if fam.norm_plus_one and name.endswith("norm.weight"):
      w = w - 1.0
    return w

  def tensors():
    for t in reader.tensors:
      name = hf_name(t.name)
      yield name, (lambda t=t, n=name: load(t, n))

  def save_tokenizer(out: pathlib.Path) -> bool:
    if _field(reader, "tokenizer.ggml.model") is None:
      return False  # a GGUF without a tokenizer: the converted folder has none either
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    return True

  return config, tensors, len(reader.tensors), save_tokenizer
