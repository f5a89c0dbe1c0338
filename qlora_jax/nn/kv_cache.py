"""The keys and values generation keeps of every layer, written slot by slot in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qlora_jax.nn.model_config import ModelConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer for generation, written slot by slot in place.

  k and v hold the values' bits as unsigned integers of their width (`dtype` names the values):
  each layer writes its new keys and values into its cache in place, and XLA:CPU computes an
  update of a 16-bit float array in float32 (converting the whole cache at every write), while an
  integer update is a copy of the new slots on every platform.

  Stacked ([L, B, S, KV, H] each: what a scan over the layers carries, a traced layer index) or
  per layer (a tuple of L arrays [B, S, KV, H]: unrolled layers, int indices). Per layer, attention
  reads a layer's keys as a whole buffer; from the stacked array XLA's GPU attention products
  read a copy of the layer's slice, two copies of its whole cache a layer and token
  (docs/BENCHMARKS.md, "Generation")."""

  k: jax.Array | tuple[jax.Array, ...]  # unsigned integer bits
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
  next_position: jax.Array  # [B] int32: rotary position of the next token
  index: jax.Array  # [] int32: next slot to write
  dtype: str = struct.field(pytree_node=False)  # of the keys and values (k, v: bits of its width)

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, length: int, dtype, *,
            per_layer: bool = False) -> "KVCache":
    dtype = jnp.dtype(dtype)
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    bits = jnp.dtype(f"uint{8 * dtype.itemsize}")  # zero bits: 0.0
    layers = config.num_hidden_layers

    def zeros():
      if per_layer:
        return tuple(jnp.zeros(shape, bits) for _ in range(layers))
      return jnp.zeros((layers, *shape), bits)
    return cls(k=zeros(), v=zeros(), valid=jnp.zeros((batch, length), bool),
               next_position=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32),
               dtype=dtype.name)

  def write(self, layer, k_BxTxKVxH: jax.Array, v_BxTxKVxH: jax.Array) -> "KVCache":
    """The cache with layer `layer`'s (an int, or traced under the layer scan of a stacked
    cache) new keys and values written at slots index .. index + T."""
    values = jnp.dtype(self.dtype)
    bits = jnp.dtype(f"uint{8 * values.itemsize}")

    def put(all_bits, new):
      new = jax.lax.bitcast_convert_type(new.astype(values), bits)
      if isinstance(all_bits, tuple):
        return (*all_bits[:layer], jax.lax.dynamic_update_slice(all_bits[layer], new, (0, self.index, 0, 0)),
                *all_bits[layer + 1:])
      return jax.lax.dynamic_update_slice(all_bits, new[None], (layer, 0, self.index, 0, 0))
    return self.replace(k=put(self.k, k_BxTxKVxH), v=put(self.v, v_BxTxKVxH))

  def read(self, layer) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values [B, S, KV, H], every slot."""
    return tuple(jax.lax.bitcast_convert_type(a[layer], jnp.dtype(self.dtype)) for a in (self.k, self.v))
