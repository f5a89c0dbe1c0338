"""Random models for tests and benchmarks: named Llama shapes, 4-bit weights made directly in
quantized form (no full-precision weight ever exists), adapters initialised as training does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.format.quantization import QuantConfig, QuantizedArray, zeros_quantized
from qlora_jax.io.loading import init_trainable, placer
from qlora_jax.nn.model import CausalLM, ModelOptions, variable_names
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.variables import FrozenParam, QuantWeight

# Model shapes the benchmarks and the memory estimate name (transformers config fields).
SHAPES = {
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=64),
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama-65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64, head_dim=128),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960),
    # Gemma 3 12B (text): 5 sliding-window layers to each global one, head_dim 256, 262k vocabulary.
    "gemma3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       max_position_embeddings=131072, tie_word_embeddings=True, sliding_window=1024,
                       layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(48)),
                       hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=256),
    # Gemma 2 9B: sliding-window layers alternating with global ones, softcaps, 256k vocabulary.
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=4096,
                      layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(42)),
                      hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # Phi-4-mini: fused projections split at conversion, 3/4 of each head rotated, 200k vocabulary.
    # Qwen3-30B-A3B: 48 layers of 128 experts (intermediate 768), 8 a token, renormalized.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True),
    "phi4-mini": dict(model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=131072, tie_word_embeddings=True, partial_rotary_factor=0.75),
}


def shape_config(name: str) -> ModelConfig:
  """The ModelConfig of a named shape; ValueError naming the shapes otherwise."""
  if name not in SHAPES:
    raise ValueError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}")
  return ModelConfig(**{"model_type": "llama", **SHAPES[name]})


def random_quantized(key: jax.Array, shape: tuple[int, ...], quant: QuantConfig) -> QuantizedArray:
  """A random 4-bit tensor made directly in quantized form (no full-precision weight ever exists):
  uniform codes, scales near 0.025 (the magnitude of a trained Llama weight block's absmax)."""
  like = zeros_quantized(shape, quant)
  k1, k2 = jax.random.split(key)
  codes = jax.random.bits(k1, like.codes.shape, jnp.uint8)
  if quant.double_quant:  # codes of the upper half of the dynamic map: absmax = 0.02 + 0.01 * q
    absmax = jax.random.randint(k2, like.absmax.shape, 160, 256).astype(jnp.uint8)
    return like.replace(codes=codes, absmax=absmax, nested_absmax=jnp.full_like(like.nested_absmax, 0.01),
                        offset=jnp.float32(0.02))
  return like.replace(codes=codes, absmax=jax.random.uniform(k2, like.absmax.shape, jnp.float32, 0.02, 0.03))


def random_model(config: ModelConfig, options: ModelOptions, seed: int = 0, layout=None) -> CausalLM:
  """A model with random base weights, 4-bit from the start, each variable made by one jitted
  call straight into its layout (on the default device without one); variables of one shape
  share a maker, so JAX compiles it once (an unrolled 8B model: a handful, not hundreds)."""
  make = lambda: CausalLM(config, options, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, base, rest = nnx.split(nnx.eval_shape(make), nnx.Any(QuantWeight, FrozenParam), ...)
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(base)):
    spec, k = var.get_raw_value(), jax.random.fold_in(key, i)
    if isinstance(var, QuantWeight):
      layers = [n for _, n in variable_names(path, config, options)]
      fn = _quantized_maker(spec.shape, None if layers[0] is None else len(layers), options.quant)
    else:
      fn = _dense_maker(spec.shape, spec.dtype, ones=path[-2].endswith("norm"))
    out = None if layout is None else layout.value_shardings(var, path, jax.eval_shape(fn, k))
    var.set_value(jax.jit(fn, out_shardings=out)(k))
  return nnx.merge(graphdef, base, init_trainable(rest, seed, placer(layout, rest)))


@functools.lru_cache(maxsize=None)
def _quantized_maker(shape: tuple, layers: int | None, quant: QuantConfig):
  """key -> a random 4-bit weight; a stack of `layers`: layer j from fold_in(key, j), vmapped."""
  one = lambda k, j: random_quantized(jax.random.fold_in(k, j), shape, quant)  # noqa: E731
  if layers is None:
    return lambda k: one(k, 0)
  return lambda k: jax.vmap(one, in_axes=(None, 0))(k, jnp.arange(layers))


@functools.lru_cache(maxsize=None)
def _dense_maker(shape: tuple, dtype, *, ones: bool):
  """key -> a norm's scale (ones) or a dense weight (0.02 * N(0, 1))."""
  if ones:
    return lambda k: jnp.ones(shape, dtype)
  return lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
