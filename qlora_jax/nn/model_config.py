"""The decoder's shape, read from a transformers `config.json` (the families: families.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from qlora_jax.nn.families import Family, family as family_of, text_config

ROPE_TYPES = ("default", "llama3", "linear", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # transformers' names


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
  """Rotary embedding: theta and optional frequency scaling ("llama3" as in Llama 3.1; "longrope"
  as in Phi-3.5 / Phi-4-mini: per-frequency factors, short ones up to the original context and
  long ones past it, the rotation scaled by attention_factor)."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  attention_factor: float = 1.0

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
    if self.rope_type == "longrope" and not (self.short_factor and len(self.short_factor) == len(self.long_factor)):
      raise ValueError("longrope needs short_factor and long_factor lists of one length (rotary_dim / 2)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Decoder-only transformer shape. Field names follow transformers' config.json."""

  model_type: str = "llama"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama's attention_bias)
  o_bias: bool = False  # bias on o_proj (Llama's attention_bias; never in Qwen2)
  mlp_bias: bool = False
  sliding_window: int | None = None
  # per layer, where the window applies to some layers only (Gemma 2/3); () = every layer alike
  layer_types: tuple[str, ...] = ()
  rope_local: RopeConfig | None = None  # the sliding layers' rotary embedding, where it differs
  hidden_act: str = "silu"  # the gated MLP's activation
  attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
  final_logit_softcapping: float | None = None  # the same on the output logits
  query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (else head_dim's)
  partial_rotary_factor: float = 1.0  # the leading fraction of each head that rotates (Phi-4-mini)
  # Mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is num_experts gated MLPs of
  # moe_intermediate_size, num_experts_per_tok of them per token, weighted by the router's
  # softmax over its top-k (renormalized over them when norm_topk_prob). 0 experts: dense MLPs.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None

  def __post_init__(self):
    family_of(self.model_type)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads})")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be >= 1 (or None), got {self.sliding_window}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.layer_types and (len(self.layer_types) != self.num_hidden_layers or self.sliding_window is None):
      raise ValueError(f"layer_types needs one entry per layer ({self.num_hidden_layers}) and a "
                       f"sliding_window, got {len(self.layer_types)} entries, window {self.sliding_window}")
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
      raise ValueError(f"partial_rotary_factor must be in (0, 1] and leave an even rotary_dim, got "
                       f"{self.partial_rotary_factor} (rotary_dim {self.rotary_dim})")
    if family_of(self.model_type).experts != bool(self.num_experts):
      raise ValueError(f"model_type={self.model_type!r} {'needs' if self.num_experts == 0 else 'has no'} "
                       f"experts (num_experts={self.num_experts})")
    if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0):
      raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}) and "
                       f"moe_intermediate_size > 0, got {self.num_experts_per_tok}, {self.moe_intermediate_size}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden activation {self.hidden_act!r}; supported: {ACTIVATIONS}")

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend within sliding_window only? () when all layers are alike."""
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def rotary_dim(self) -> int:
    """The leading dimensions of each head the rotary embedding turns (all: head_dim)."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def mlp_width(self) -> int:
    """Features of a token's [tokens, intermediate] MLP tensors: with experts, its k copies'."""
    return self.num_experts_per_tok * self.moe_intermediate_size if self.num_experts else self.intermediate_size

  @property
  def family(self) -> Family:
    """The family's switches (nn/families.py: qk_norm, norm_plus_one, sandwich_norms, ...)."""
    return family_of(self.model_type)

  @property
  def q_dim(self) -> int:
    return self.num_attention_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_key_value_heads * self.head_dim

  @property
  def linear_shapes(self) -> dict[str, tuple[int, int]]:
    """(in, out) features of each of a decoder layer's linear layers, by name: the seven, or with
    experts (whose MLPs are nn/moe.py's packed tensors) the attention's four."""
    h, f = self.hidden_size, self.intermediate_size
    attention = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                 "o_proj": (self.q_dim, h)}
    return attention if self.num_experts else {**attention, "gate_proj": (h, f), "up_proj": (h, f),
                                                "down_proj": (f, h)}

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Build from a transformers config dict (v4 `rope_scaling` or v5 `rope_parameters`)."""
    try:
      return cls._from_hf(hf)
    except (KeyError, TypeError) as e:
      raise ValueError(f"the transformers config lacks or mistypes a field ({type(e).__name__}: {e})") from e

  @classmethod
  def _from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    hf = text_config(hf)
    model_type = hf.get("model_type")
    fam = family_of(model_type, hf.get("architectures"))
    heads = hf["num_attention_heads"]
    return cls(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope=_rope_from_hf(hf, "full_attention"),
        rope_local=_rope_from_hf(hf, "sliding_attention") if fam.layer_rope else None,
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        partial_rotary_factor=float((hf.get("rope_parameters") or {}).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        mlp_bias=bool(hf.get("mlp_bias", False)), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), **fam.hf_fields(hf), **_experts_from_hf(hf, fam))

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> "ModelConfig":
    path = pathlib.Path(path)
    if not path.is_file():
      raise ValueError(f"missing {path}: a model folder needs the transformers config.json")
    try:
      return cls.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from e


def _experts_from_hf(hf: dict[str, Any], fam: Family) -> dict[str, Any]:
  """The mixture-of-experts fields (Qwen3-MoE's names, or Mixtral's num_local_experts with
  experts of intermediate_size that always renormalize their top-k)."""
  if not fam.experts:
    return {}
  if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
    raise ValueError(f"model_type={hf.get('model_type')!r} with dense layers among the expert layers "
                     f"(mlp_only_layers={hf.get('mlp_only_layers')}, decoder_sparse_step="
                     f"{hf.get('decoder_sparse_step')}) is not supported: every layer must have experts")
  return {"num_experts": int(hf.get("num_experts") or hf["num_local_experts"]),
          "num_experts_per_tok": int(hf["num_experts_per_tok"]),
          "moe_intermediate_size": int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
          "norm_topk_prob": bool(hf.get("norm_topk_prob", fam.norm_topk_default))}


def _rope_from_hf(hf: dict[str, Any], layer_type: str) -> RopeConfig:
  """The rotary embedding of one kind of layer: transformers 5 keys rope_parameters by layer
  type where they differ (Gemma 3); before it, the local layers' base was rope_local_base_freq."""
  params = dict(hf.get("rope_parameters") or {})
  if layer_type in params:
    params = dict(params[layer_type])
  elif layer_type == "sliding_attention":
    return RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
  scaling = hf.get("rope_scaling") or {}
  params = {**scaling, **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if "original_max_position_embeddings" in hf:  # the top-level field wins, as in transformers
    params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  fields = {k: params[k] for k in keys if k in params}
  if rope_type == "longrope":  # Phi-3's: the attention factor from the context's growth
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    attention = params.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    fields.update(short_factor=tuple(map(float, params["short_factor"])),
                  long_factor=tuple(map(float, params["long_factor"])), attention_factor=float(attention))
  return RopeConfig(theta=float(theta), rope_type=rope_type, **fields)
