"""The keys and values generation keeps of every layer, written slot by slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qlora_jax.nn.model_config import ModelConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer for generation, written slot by slot."""

  k: jax.Array  # [L, B, S, KV, H]
  v: jax.Array  # [L, B, S, KV, H]
  valid: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
  next_position: jax.Array  # [B] int32: rotary position of the next token
  index: jax.Array  # [] int32: next slot to write

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               valid=jnp.zeros((batch, length), bool), next_position=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((), jnp.int32))
