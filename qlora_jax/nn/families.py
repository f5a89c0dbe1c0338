"""Model families: everything that differs between the decoder architectures qlora_jax reads,
in one table. A new family adds a row here (and, where its layers differ, a branch in model.py
keyed on the row's fields), not a special case in the readers.

The names are transformers': a checkpoint key is the dotted path of the model variable it fills.
"""

from __future__ import annotations

import dataclasses
import re

# transformers' layer_types: a sliding-window layer or a full-attention one.
LAYER_TYPES = ("sliding_attention", "full_attention")

# The seven linear layers of a decoder block, transformers' names: the 4-bit, LoRA-able layers.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A mixture of experts' two stacked products (nn/moe.py), LoRA-able per expert when named in
# lora targets; PEFT targets them as parameters (target_parameters "mlp.experts.<name>").
EXPERT_NAMES = ("experts.gate_up_proj", "experts.down_proj")
LORA_TARGETS = LINEAR_NAMES + EXPERT_NAMES


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model_type departs from the Llama decoder."""

  model_type: str
  gguf_architecture: str | None = None  # llama.cpp's general.architecture, where it exports it
  qkv_bias_always: bool = False  # q/k/v carry a bias whatever attention_bias says (Qwen2)
  o_bias_never: bool = False  # o_proj never carries one (Qwen2)
  window_needs_flag: bool = False  # sliding_window applies only with use_sliding_window (Qwen2/3)
  qk_norm: bool = False  # an RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
  norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
  scaled_embedding: bool = False  # embeddings times sqrt(hidden), in the model's dtype (Gemma)
  sandwich_norms: bool = False  # norms after attention and around the MLP too (Gemma 2/3)
  layer_rope: bool = False  # local (sliding) layers take their own rope base (Gemma 3)
  fused: bool = False  # stores qkv_proj and gate_up_proj (Phi-3): split at conversion (FUSED)
  layer_pattern: int = 0  # without layer_types: every Nth layer full, the rest sliding (Gemma 2: 2, 3: 6)
  tied_default: bool = False  # tie_word_embeddings when config.json omits it (its class default)
  experts: bool = False  # every layer's MLP is a mixture of experts (nn/moe.py)
  norm_topk_default: bool = False  # renormalize the top-k router weights when config.json is silent

  def hf_fields(self, hf: dict) -> dict:
    """The ModelConfig fields whose reading differs by family, from a transformers config."""
    attention_bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window")
    if self.window_needs_flag and not hf.get("use_sliding_window", False):
      window = None
    types = tuple(hf.get("layer_types") or ())
    if not types and window is not None and self.layer_pattern:  # as transformers' config class
      every = int(hf.get("sliding_window_pattern") or self.layer_pattern)
      types = tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention"
                    for i in range(hf["num_hidden_layers"]))
    unknown = set(types) - set(LAYER_TYPES)
    if unknown:
      raise ValueError(f"model_type={self.model_type!r}: unknown layer_types {sorted(unknown)}; "
                       f"supported: {LAYER_TYPES}")
    if types and set(types) == {"full_attention"}:
      window = None  # no layer slides
    if window is None or len(set(types)) < 2:
      types = ()  # one kind of layer: the window (if any) applies to all
    if hf.get("use_bidirectional_attention"):
      raise ValueError(f"model_type={self.model_type!r} with use_bidirectional_attention is an "
                       "encoder, not a causal LM; use a causal checkpoint")
    return {"qkv_bias": self.qkv_bias_always or attention_bias,
            "o_bias": not self.o_bias_never and attention_bias, "sliding_window": window,
            "layer_types": types, "tie_word_embeddings": bool(hf.get("tie_word_embeddings", self.tied_default))}


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", gguf_architecture="llama"),
    Family("mistral"),
    Family("qwen2", gguf_architecture="qwen2", qkv_bias_always=True, o_bias_never=True,
           window_needs_flag=True),
    Family("qwen3", gguf_architecture="qwen3", window_needs_flag=True, qk_norm=True),
    Family("gemma2", gguf_architecture="gemma2", norm_plus_one=True, scaled_embedding=True,
           sandwich_norms=True, layer_pattern=2, tied_default=True),
    Family("gemma3_text", gguf_architecture="gemma3", qk_norm=True, norm_plus_one=True,
           scaled_embedding=True, sandwich_norms=True, layer_rope=True, layer_pattern=6, tied_default=True),
    Family("phi3", gguf_architecture="phi3", fused=True),
    Family("qwen3_moe", window_needs_flag=True, qk_norm=True, experts=True),
    Family("mixtral", experts=True, norm_topk_default=True),
)}

# Multimodal checkpoints whose language model is a supported family: the model is config.json's
# text_config, its tensors carry a prefix (transformers 4's and 5's), the vision tower and the
# projector are not read, and a converted folder holds the language model alone.
MULTIMODAL = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")


def text_config(hf: dict) -> dict:
  """The language model's transformers config: hf itself, or a multimodal checkpoint's text_config."""
  if hf.get("model_type") not in MULTIMODAL or "text_config" not in hf:
    return hf
  model_type, architecture = MULTIMODAL[hf["model_type"]]
  text = {**hf["text_config"], "model_type": model_type, "architectures": [architecture]}
  if "tie_word_embeddings" in hf:
    text.setdefault("tie_word_embeddings", hf["tie_word_embeddings"])
  return text


def text_name(name: str) -> str | None:
  """A tensor's name in the language model's terms; None for a multimodal model's other parts."""
  for old, new in TEXT_PREFIXES:
    if name.startswith(old):
      return new + name[len(old):]
  return None if name.startswith(NON_TEXT_PREFIXES) else name


# Fused projections a family may store, and the layers each is split into, in its row order.
# Splitting at conversion keeps one layout for the kernels, LoRA, sharding and the estimate (a
# fused matmul would be one kernel call instead of three: the split costs launches, not FLOPs);
# PEFT export fuses the adapters back under these names (export.py).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_INTO = {part: group for group, parts in FUSED.items() for part in parts}


def fused_rows(group: str, linear_shapes: dict[str, tuple[int, int]]) -> dict[str, slice]:
  """Each part's rows of the fused tensor `group`, in order (sizes: ModelConfig.linear_shapes)."""
  rows, start = {}, 0
  for part in FUSED[group]:
    rows[part] = slice(start, start + linear_shapes[part][1])
    start = rows[part].stop
  return rows


def fused_parts(name: str) -> tuple[str, str] | None:
  """(prefix, fused layer) of a fused tensor's name, e.g.
  model.layers.3.self_attn.qkv_proj.weight -> ("model.layers.3.self_attn.", "qkv_proj")."""
  m = re.fullmatch(rf"(model\.layers\.\d+\.\w+\.)({'|'.join(FUSED)})\.weight", name)
  return (m.group(1), m.group(2)) if m else None


SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str | None, architectures=None) -> Family:
  """The family of a model_type; ValueError naming the supported ones otherwise."""
  if model_type not in FAMILIES:
    raise ValueError(f"unsupported architecture: model_type={model_type!r} "
                     f"(architectures={architectures}); supported: {SUPPORTED_MODEL_TYPES}")
  return FAMILIES[model_type]


def gguf_family(architecture: str) -> Family:
  """The family llama.cpp's general.architecture names; ValueError for others."""
  by_arch = {f.gguf_architecture: f for f in FAMILIES.values() if f.gguf_architecture}
  if architecture not in by_arch:
    raise ValueError(f"unknown GGUF architecture {architecture!r}; supported: {sorted(by_arch)}")
  return by_arch[architecture]


# Canonical (transformers) tensor names of the supported families -> how they are stored.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "dense"),
    (r"model\.norm\.weight", "dense"),
    (r"lm_head\.weight", "dense"),
    (r"model\.layers\.\d+\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight", "dense"),
    (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight", "quantized"),
    (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias", "dense"),
    (r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight", "dense"),
    (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", "quantized"),
    (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.bias", "dense"),
    (r"model\.layers\.\d+\.mlp\.experts\.(gate_up|down)_proj", "quantized"),  # [experts, out, in]
    (r"model\.layers\.\d+\.mlp\.gate\.weight", "dense"),  # the router [experts, hidden]
)
# Buffers some checkpoints carry that are recomputed rather than loaded.
IGNORED_KEYS = (r".*\.rotary_emb\.inv_freq",)


def ignored(name: str) -> bool:
  """A stored buffer that is recomputed, never loaded."""
  return any(re.fullmatch(p, name) for p in IGNORED_KEYS)


def classify(name: str) -> str:
  """'quantized' | 'dense' | 'ignored' for a tensor name; ValueError for anything else."""
  if ignored(name):
    return "ignored"
  for pattern, kind in KEY_TABLE:
    if re.fullmatch(pattern, name):
      return kind
  raise ValueError(f"unexpected tensor {name!r}: not part of a {'/'.join(SUPPORTED_MODEL_TYPES)} decoder")
