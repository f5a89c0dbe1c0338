"""Rotary position embeddings (HF's rotate-half convention), with Llama 3.1 frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.nn.model_config import RopeConfig


def rotation(positions_BxT: jax.Array, rope: RopeConfig, dim: int) -> tuple[jax.Array, jax.Array]:
  """float32 cos and sin [B, T, dim] of the rope at integer positions. longrope takes its long
  factors when the call reaches past the original context (transformers decides per call by the
  largest position, so do we) and scales both by its attention factor."""
  if rope.rope_type != "longrope":
    return cos_sin(positions_BxT, inverse_frequencies(rope, dim))
  short = cos_sin(positions_BxT, inverse_frequencies(rope, dim))
  long = cos_sin(positions_BxT, inverse_frequencies(rope, dim, long=True))
  use_long = jnp.max(positions_BxT) + 1 > rope.original_max_position_embeddings
  return tuple(jnp.where(use_long, b, a) * np.float32(rope.attention_factor) for a, b in zip(short, long))


def inverse_frequencies(rope: RopeConfig, head_dim: int, long: bool = False) -> np.ndarray:
  """float32[head_dim // 2] rotation frequencies, scaled as the rope type asks (longrope: by its
  short factors, or its long ones)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  if rope.rope_type == "longrope":
    factors = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
    return (1.0 / (factors * np.power(np.float32(rope.theta), exponents))).astype(np.float32)
  inv = (1.0 / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
  if rope.rope_type == "linear":
    return (inv / np.float32(rope.factor)).astype(np.float32)
  if rope.rope_type == "llama3":
    return _llama3_scaling(inv, rope)
  return inv


def _llama3_scaling(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
  """Keep high frequencies, divide low ones by `factor`, interpolate smoothly in between."""
  old_len = rope.original_max_position_embeddings
  low_wavelen = old_len / rope.low_freq_factor
  high_wavelen = old_len / rope.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
  smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """float32 cos and sin [B, T, head_dim] for integer positions."""
  freqs = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, in x's dtype, over the leading cos.shape[-1] dimensions of
  each head (a partial rotary factor leaves the rest as they are)."""
  rotary = cos_BxTxH.shape[-1]
  if rotary < x_BxTxNxH.shape[-1]:
    turned = apply_rope(x_BxTxNxH[..., :rotary], cos_BxTxH, sin_BxTxH)
    return jnp.concatenate([turned, x_BxTxNxH[..., rotary:]], axis=-1)
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  cos = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
  sin = sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
  return x_BxTxNxH * cos + rotated * sin
