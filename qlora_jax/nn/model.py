"""The decoder of the families in nn/families.py (Llama 1-3.2, Mistral, Qwen2/3, Gemma 2/3) in Flax
NNX with QLoRA linear layers; where the families differ is read from ModelConfig's fields.

Module and attribute names mirror transformers' (`model.layers.3.self_attn.q_proj.weight`), so a
checkpoint key is the dotted path of the variable it fills. All seven linear layers of a block are
4-bit QLoRALinear; embeddings, norms and lm_head are dense `FrozenParam`s in the model dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.xla import frozen_weight, precision_for
from qlora_jax.nn.attention import attend, attention_implementation, make_mask
from qlora_jax.format.quantization import QuantizedArray
from qlora_jax.nn.families import EXPERT_NAMES
from qlora_jax.nn.kv_cache import KVCache
from qlora_jax.nn.lora import QLoRALinear, shared_input
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.model_options import ModelOptions
from qlora_jax.nn.moe import SparseMoeBlock
from qlora_jax.nn.remat import LAYER_INPUT, REMAT_POLICIES
from qlora_jax.nn.rope import apply_rope, rotation
from qlora_jax.nn.variables import FrozenParam, QuantWeight


def mlp_pieces(tokens: int, chunk: int) -> tuple[int, int]:
  """(pieces, tokens a piece) of ModelOptions.mlp_chunk: equal pieces of at most `chunk` tokens
  (the last one padded); (1, tokens) when chunk is 0 or covers them all."""
  pieces = -(-tokens // chunk) if 0 < chunk < tokens else 1
  return pieces, -(-tokens // pieces)


def _linear(name: str, d_in: int, d_out: int, bias: bool, opts: ModelOptions, rngs) -> QLoRALinear:
  lora = opts.lora if opts.lora is not None and name in opts.lora.targets else None
  return QLoRALinear(d_in, d_out, lora=lora, quant=opts.quant, use_bias=bias,
                     compute_dtype=opts.dtype, backend=opts.backend, rngs=rngs)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, the statistics in float32; plus_one (Gemma): x / rms(x) * (1 + weight),
  all in float32, rounded once."""

  def __init__(self, dim: int, eps: float, dtype: str, plus_one: bool = False):
    self.weight = FrozenParam(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype))
    self.eps, self.plus_one = eps, plus_one

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    xf = x_BxTxD.astype(jnp.float32)
    normed = xf * self._inverse_rms(xf)
    if self.plus_one:
      return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x_BxTxD.dtype)
    return (self.weight[...] * normed.astype(x_BxTxD.dtype)).astype(x_BxTxD.dtype)

  def split(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x * weight in x's dtype, 1 / rms(x) [..., 1] float32): the norm as a scale that a linear
    map's output can take instead of its input (shared_input)."""
    xf = x_BxTxD.astype(jnp.float32)
    w = self.weight[...].astype(jnp.float32) + (1.0 if self.plus_one else 0.0)
    return (xf * w).astype(x_BxTxD.dtype), self._inverse_rms(xf)

  def _inverse_rms(self, xf: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)


def _norm(cfg: ModelConfig, opts: ModelOptions, dim: int | None = None) -> RMSNorm:
  return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, opts.dtype, cfg.family.norm_plus_one)


class VocabMatrix(nnx.Module):
  """A frozen dense [vocab, hidden] matrix: the token embedding, or an untied lm_head."""

  def __init__(self, vocab: int, hidden: int, dtype: str):
    self.weight = FrozenParam(jnp.zeros((vocab, hidden), dtype))


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings."""

  def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
    shapes = cfg.linear_shapes
    self.q_proj = _linear("q_proj", *shapes["q_proj"], cfg.qkv_bias, opts, rngs)
    self.k_proj = _linear("k_proj", *shapes["k_proj"], cfg.qkv_bias, opts, rngs)
    self.v_proj = _linear("v_proj", *shapes["v_proj"], cfg.qkv_bias, opts, rngs)
    self.o_proj = _linear("o_proj", *shapes["o_proj"], cfg.o_bias, opts, rngs)
    self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.softcap, self.scale = cfg.attn_logit_softcapping, cfg.attention_scale
    self.window = cfg.sliding_window  # of every layer, or (layers of two kinds) of the local ones
    self.implementation = attention_implementation(opts.attention, opts.dtype, cfg.head_dim, self.softcap)
    self.name_residuals = opts.remat == "offload_attention"
    if cfg.family.qk_norm:
      self.q_norm, self.k_norm = _norm(cfg, opts, cfg.head_dim), _norm(cfg, opts, cfg.head_dim)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x_BxTxD, cos, sin, mask_BxTxS, kv=None, local=None, norm=None):
    """norm: the pre-norm, applied to x here (shared_input), or None. mask_BxTxS: bool (carrying
    any window), or None for causal attention within the model's sliding window, if it has one,
    which the attention kernel computes without a [T, S] mask.
    local: for layers of two kinds, whether the window applies to this one (bool, or traced under
    the layer scan: then both kernels are compiled and lax.cond picks one). kv: (the KVCache,
    this layer's index: an int, or traced under the layer scan), or None; the new keys and values
    are written into the whole cache in place (no layer's cache is copied per token), and the
    cache so written is returned in kv's place."""
    b, t, _ = x_BxTxD.shape
    q, k, v = shared_input((self.q_proj, self.k_proj, self.v_proj), x_BxTxD, norm)
    q = q.reshape(b, t, self.heads, self.head_dim)
    k, v = (a.reshape(b, t, self.kv_heads, self.head_dim) for a in (k, v))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    decoding = kv is not None
    if decoding:
      cache, layer = kv
      kv = cache.write(layer, k, v)  # returned: the cache with this layer's new slots
      k, v = kv.read(layer)
    # Generation (kv given) attends few queries to a long cache: one kernel launch a step where
    # it applies (attend's "decode"), XLA's kernels otherwise.
    def attention(q, k, v, window, name_residuals):
      return attend(q, k, v, mask_BxTxS, implementation="decode" if decoding else self.implementation,
                    scale=self.scale, window=window, softcap=self.softcap, name_residuals=name_residuals)
    if isinstance(local, jax.Array) and mask_BxTxS is None and self.window:
      # a scanned layer of either kind, mask-free: each branch a causal kernel with a static window
      # (offload_attention's residuals are not named inside the cond, whose outputs XLA's host
      # offloading is not known to move: there the attention forward is recomputed, as under offload)
      out = jax.lax.cond(local, functools.partial(attention, window=self.window, name_residuals=False),
                         functools.partial(attention, window=None, name_residuals=False), q, k, v)
    else:
      window = self.window if local is None or local is True else None  # (a mask carries its own)
      out = attention(q, k, v, window, self.name_residuals and not decoding)
    return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), kv


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU (Gemma)."""

  def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
    if opts.router_aux_loss or (opts.lora is not None and set(opts.lora.targets) & set(EXPERT_NAMES)):
      raise ValueError(f"lora targets {EXPERT_NAMES} and router_aux_loss need a mixture-of-experts "
                       f"model; model_type={cfg.model_type!r} has none: drop them")
    self.act = ACTIVATIONS[cfg.hidden_act]
    shapes = cfg.linear_shapes
    self.gate_proj = _linear("gate_proj", *shapes["gate_proj"], cfg.mlp_bias, opts, rngs)
    self.up_proj = _linear("up_proj", *shapes["up_proj"], cfg.mlp_bias, opts, rngs)
    self.down_proj = _linear("down_proj", *shapes["down_proj"], cfg.mlp_bias, opts, rngs)

  def __call__(self, x_BxTxD, norm=None):
    """norm: the pre-norm, applied to x here (shared_input), or None."""
    gate, up = shared_input((self.gate_proj, self.up_proj), x_BxTxD, norm)
    return self.down_proj(self.act(gate) * up)


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP, each with a residual connection. With sandwich norms (Gemma)
  post_attention_layernorm normalizes the attention's output, and the MLP is wrapped in
  pre_feedforward_layernorm and post_feedforward_layernorm."""

  def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
    self.input_layernorm = _norm(cfg, opts)
    self.self_attn = Attention(cfg, opts, rngs)
    self.post_attention_layernorm = _norm(cfg, opts)
    sandwich = cfg.family.sandwich_norms
    self.pre_feedforward_layernorm = _norm(cfg, opts) if sandwich else None
    self.post_feedforward_layernorm = _norm(cfg, opts) if sandwich else None
    moe = bool(cfg.num_experts)  # no MLP pieces for experts: each sees only its own tokens
    self.mlp = (SparseMoeBlock(cfg, opts.quant, opts.dtype, ACTIVATIONS[cfg.hidden_act], opts.lora, rngs,
                               record_stats=bool(opts.router_aux_loss)) if moe else MLP(cfg, opts, rngs))
    self.mlp_chunk = 0 if moe else opts.mlp_chunk

  def __call__(self, h_BxTxD, cos, sin, mask_BxTxS, kv=None, local=None):
    """local: for layers of two kinds (Gemma 2/3), whether this one is a sliding-window layer;
    cos, sin and the mask then come as (full layers', sliding layers') pairs."""
    if local is not None:
      cos, sin = _pick(local, cos), _pick(local, sin)
      mask_BxTxS = None if mask_BxTxS is None else _pick(local, mask_BxTxS)
    h_BxTxD = checkpoint_name(h_BxTxD, LAYER_INPUT)
    attn, kv = self.self_attn(h_BxTxD, cos, sin, mask_BxTxS, kv, local, norm=self.input_layernorm)
    if self.pre_feedforward_layernorm is not None:
      attn = self.post_attention_layernorm(attn)
    h_BxTxD = h_BxTxD + attn
    if kv is None and mlp_pieces(h_BxTxD.shape[0] * h_BxTxD.shape[1], self.mlp_chunk)[0] > 1:
      return h_BxTxD + self._chunked_mlp(h_BxTxD), kv
    norm, mlp, *post = self._mlp_modules()
    return h_BxTxD + _in_turn(post, mlp(h_BxTxD, norm=norm)), kv

  def _mlp_modules(self) -> tuple:
    """The MLP block's modules in order: its norm(s) and the MLP."""
    if self.pre_feedforward_layernorm is None:
      return self.post_attention_layernorm, self.mlp
    return self.pre_feedforward_layernorm, self.mlp, self.post_feedforward_layernorm

  def _chunked_mlp(self, h_BxTxD):
    """norm + MLP over equal pieces of at most mlp_chunk tokens (the last padded), scanned so
    that the backward recomputes and differentiates one piece's [tokens, intermediate] tensors
    at a time. The 4-bit weights are dequantized once, before the pieces, and handed to each as
    its dense frozen weight."""
    b, t, d = h_BxTxD.shape
    tokens = b * t
    pieces, size = mlp_pieces(tokens, self.mlp_chunk)
    flat = jnp.pad(h_BxTxD.reshape(tokens, d), ((0, pieces * size - tokens), (0, 0)))
    modules = self._mlp_modules()
    graphdef, rng, quant, rest = nnx.split(modules, nnx.RngState, QuantWeight, ...)
    dense = jax.tree.map(lambda q: frozen_weight(q, h_BxTxD.dtype), quant,
                         is_leaf=lambda x: isinstance(x, QuantizedArray))

    @jax.checkpoint
    def piece(rng, x):  # pure: the dropout streams' advanced state comes back out
      merged = nnx.merge(graphdef, rng, dense, rest)
      return nnx.state(merged, nnx.RngState), _in_turn(merged, x)

    rng, out = jax.lax.scan(piece, rng, flat.reshape(pieces, size, d))
    nnx.update(modules, rng)
    return out.reshape(pieces * size, d)[:tokens].reshape(b, t, d)


def _in_turn(modules, x):
  for module in modules:
    x = module(x)
  return x


def _pick(local, pair):
  """pair[1] for a sliding-window layer, pair[0] for a full one (local: bool, or traced)."""
  if isinstance(local, bool):
    return pair[1] if local else pair[0]
  return jnp.where(local, pair[1], pair[0])


class Decoder(nnx.Module):
  """Embedding, the stack of decoder layers, final norm (transformers' `model.`).

  With scan_layers the layers are one DecoderLayer whose variables carry a leading [L] axis.
  """

  def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
    self.embed_tokens = VocabMatrix(cfg.vocab_size, cfg.hidden_size, opts.dtype)
    if opts.scan_layers:
      self.layers = _stacked_layers(cfg, opts, rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, opts, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = _norm(cfg, opts)


def _stacked_layers(cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs) -> DecoderLayer:
  @nnx.split_rngs(splits=cfg.num_hidden_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return DecoderLayer(cfg, opts, rngs)
  return make(rngs)


def variable_names(path: tuple, config: ModelConfig, options: ModelOptions) -> list[tuple[str, int | None]]:
  """The transformers tensor names a model variable holds, with the layer index it takes from a
  stacked variable (None when the variable is one tensor)."""
  if options.scan_layers and tuple(path[:2]) == ("model", "layers"):
    rest = ".".join(map(str, path[2:]))
    return [(f"model.layers.{i}.{rest}", i) for i in range(config.num_hidden_layers)]
  return [(".".join(map(str, path)), None)]


class CausalLM(nnx.Module):
  """Decoder plus lm_head: token ids [B, T] -> float32 logits [B, T, V]."""

  def __init__(self, config: ModelConfig, options: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
    self.config, self.options = config, options
    self.model = Decoder(config, options, rngs)
    self.lm_head = None if config.tie_word_embeddings else VocabMatrix(
        config.vocab_size, config.hidden_size, options.dtype)

  def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Training/scoring forward. attention_mask [B, T] (1 = real token) masks padded keys;
    positions [B, T] default to 0..T-1; segment_ids [B, T] keep packed sequences apart."""
    return self.logits(self.hidden_states(input_ids, attention_mask, positions, segment_ids))

  def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                    inputs_embeds=None):
    """The final normed hidden states [B, T, D] (the loss applies lm_head in chunks).

    With neither attention_mask nor segment_ids, attention is causal and no [B, T, T] mask is
    built (cuDNN's causal kernel skips the masked half; a right-padded row needs nothing more;
    a sliding-window layer takes the kernel's window).
    inputs_embeds [B, T, D]: input_ids' embedding rows, looked up already (the table kept in
    host memory: train/builder.py); the model's own table is then not read."""
    b, t = input_ids.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = slots if positions is None else positions
    mask = None
    if attention_mask is not None or segment_ids is not None:
      valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
      mask = self._masks(slots, slots, valid, segment_ids, segment_ids)
    return self._run(input_ids, positions, mask, None, inputs_embeds)[0]

  def _masks(self, q_slots, k_slots, valid, q_segments=None, k_segments=None):
    """The attention mask; for layers of two kinds, the (full, sliding-window) pair."""
    window = self.config.sliding_window
    if not self.config.layer_types:
      return make_mask(q_slots, k_slots, valid, q_segments, k_segments, window)
    return (make_mask(q_slots, k_slots, valid, q_segments, k_segments),
            make_mask(q_slots, k_slots, valid, q_segments, k_segments, window))

  def head_weight(self) -> jax.Array:
    """lm_head's [V, D] matrix (the embedding when tied)."""
    head = self.model.embed_tokens if self.lm_head is None else self.lm_head
    return head.weight[...]

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V]: compute-dtype operands, float32 accumulation (softcapped where
    the model says: cap * tanh(logits / cap))."""
    logits = jnp.einsum("btd,vd->btv", h_BxTxD, self.head_weight().astype(h_BxTxD.dtype),
                        preferred_element_type=jnp.float32, precision=precision_for(h_BxTxD.dtype))
    cap = self.config.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)

  def empty_cache(self, batch: int, length: int) -> KVCache:
    """An empty KV cache of `length` slots for `batch` sequences in the compute dtype: one array
    per layer for unrolled layers, stacked for the layer scan."""
    return KVCache.empty(self.config, batch, length, jnp.dtype(self.options.dtype),
                         per_layer=not self.options.scan_layers)

  def decode(self, input_ids, cache: KVCache, attention_mask=None):
    """Append input_ids [B, T] to the cache; logits [B, T, V] and the updated cache.

    A prompt may be left-padded: padded tokens (attention_mask 0) are never attended to and
    do not advance the rotary position.
    """
    if self.options.scan_layers and isinstance(cache.k, tuple):
      raise ValueError("a per-layer KV cache for scanned layers: make it stacked (KVCache.empty's "
                       "per_layer=False, or CausalLM.empty_cache)")
    b, t = input_ids.shape
    real = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    positions = cache.next_position[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)
    q_slots = cache.index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
    k_slots = jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)
    mask = self._masks(q_slots, k_slots, valid)
    h, cache = self._run(input_ids, positions, mask, cache)
    logits = self.logits(h)
    cache = cache.replace(valid=valid, next_position=cache.next_position + real.sum(1, dtype=jnp.int32),
                          index=cache.index + t)
    return logits, cache

  def _run(self, input_ids, positions, mask, cache, embeds=None):
    cfg, dtype = self.config, jnp.dtype(self.options.dtype)
    h = (self.model.embed_tokens.weight[...][input_ids] if embeds is None else embeds).astype(dtype)
    if cfg.family.scaled_embedding:  # by sqrt(hidden) rounded to the model's dtype, as transformers does
      h = h * jnp.asarray(cfg.hidden_size ** 0.5, dtype)
    cos, sin = rotation(positions, cfg.rope, cfg.rotary_dim)
    if cfg.layer_types:  # (full, sliding) layers' rotations; each layer picks its own
      local = rotation(positions, cfg.rope_local or cfg.rope, cfg.rotary_dim)
      cos, sin = (cos, local[0]), (sin, local[1])
    if self.options.scan_layers:
      h, kv = self._scan(h, cos, sin, mask, cache)
      return self.model.norm(h), kv
    kinds = cfg.local_layers or (None,) * cfg.num_hidden_layers
    for i, (layer, local) in enumerate(zip(self.model.layers, kinds)):
      h, cache = self._layer_call(layer, h, cos, sin, mask, None if cache is None else (cache, i), local)
    return self.model.norm(h), cache

  def _scan(self, h, cos, sin, mask, cache):
    """lax.scan over the stacked layer (for layers of two kinds each layer's kind a scanned
    input; the whole cache, when decoding, carried through the loop and written in place)."""
    policy = REMAT_POLICIES[self.options.remat]
    mixed = bool(self.config.layer_types)
    kinds = jnp.asarray(self.config.local_layers or (False,) * self.config.num_hidden_layers)
    if cache is None:
      def body(h, layer, local):
        return layer(h, cos, sin, mask, None, local if mixed else None)[0]
      if self.options.remat != "none":
        body = nnx.remat(body, policy=policy)
      return nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, unroll=self.options.scan_unroll)(
          h, self.model.layers, kinds), None

    def body_kv(carry, layer, local, i):  # the whole cache carried: written in place
      h, cache = carry
      return layer(h, cos, sin, mask, (cache, i), local if mixed else None)
    return nnx.scan(body_kv, in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry)(
        (h, cache), self.model.layers, kinds, jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32))

  def _layer_call(self, layer, h, cos, sin, mask, kv, local=None):
    policy = REMAT_POLICIES[self.options.remat]
    if kv is not None or self.options.remat == "none":
      return layer(h, cos, sin, mask, kv, local)
    return nnx.remat(lambda lyr, h, cos, sin, mask: lyr(h, cos, sin, mask, None, local),
                     policy=policy)(layer, h, cos, sin, mask)
