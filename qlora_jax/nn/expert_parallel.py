"""Expert parallelism: a mixture of experts' stacked 4-bit experts split over the mesh's `expert`
axis, each device computing only its own experts.

The sharding table (sharding.py) stores a stacked experts weight [E, out, in] with its flat
blocks split over `expert` (and `fsdp`) and keeps it split over `expert` in use, when every
device's chunk is whole experts whose blocks start a double-quant group (`splits`). Inside the
block, a `shard_map` over `expert` alone (the batch axes stay automatic) gives device j the
tokens of its batch shard, the routing, and experts [j E/S, (j + 1) E/S): it sends the token
copies routed to its experts through them (copies routed elsewhere sort past its groups and get
zeros), and a psum over `expert` adds the devices' parts. Tokens are not exchanged (every device
on the axis holds the same tokens, as on `tensor`): the experts' memory and FLOPs divide by S,
the attention's do not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qlora_jax.format.quantization import QuantizedArray

EXPERT_AXIS = "expert"


def splits(qa: QuantizedArray, shards: int) -> bool:
  """Whether a stacked experts weight splits into `shards` chunks of whole experts whose blocks
  (and, with double quantization, nested groups) each device can dequantize on its own."""
  if len(qa.shape) != 3 or shards <= 1 or qa.shape[0] % shards:
    return False
  blocks = qa.size // shards
  if blocks % qa.blocksize:
    return False
  return not qa.double_quant or (blocks // qa.blocksize) % qa.nested_blocksize == 0


def expert_shards() -> int:
  """The size of the current mesh's expert axis (1: none, or no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)


def local_experts(qa: QuantizedArray, shards: int) -> QuantizedArray:
  """Inside the shard_map: this device's experts as their own QuantizedArray (its codes and
  scales as it holds them, its slice of the nested scales)."""
  nested = qa.nested_absmax
  if qa.double_quant:
    groups = qa.num_blocks // shards // qa.nested_blocksize
    nested = jax.lax.dynamic_slice_in_dim(nested, jax.lax.axis_index(EXPERT_AXIS) * groups, groups)
  return qa.replace(nested_absmax=nested, shape=(qa.shape[0] // shards, *qa.shape[1:]))


def on_experts(combine, x, weights, experts, weights_qa: tuple, adapters: tuple, shards: int):
  """combine(x, weights, experts, first, weights_qa, adapters) -> [M, D] for the experts from
  `first` on, run per device of the expert axis on its own experts, summed over the axis."""
  def flat(qa):  # the codes and scales split along their flat block axis; side arrays whole
    return qa.replace(codes=P(*([None] * (qa.codes.ndim - 1)), EXPERT_AXIS),
                      absmax=P(*([None] * (qa.absmax.ndim - 1)), EXPERT_AXIS), quant_map=P(),
                      nested_absmax=None if qa.nested_absmax is None else P(),
                      nested_quant_map=None if qa.nested_quant_map is None else P(),
                      offset=None if qa.offset is None else P())

  def body(x, weights, experts, weights_qa, adapters):
    local = tuple(local_experts(qa, shards) for qa in weights_qa)
    first = jax.lax.axis_index(EXPERT_AXIS) * local[0].shape[0]
    return jax.lax.psum(combine(x, weights, experts, first, local, adapters), EXPERT_AXIS)

  adapter_specs = jax.tree.map(lambda a: P(EXPERT_AXIS), adapters)
  return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(), P(), P(), tuple(flat(qa) for qa in weights_qa), adapter_specs),
                       out_specs=P(), axis_names={EXPERT_AXIS}, check_vma=False)(x, weights, experts, weights_qa, adapters)


def local_choices(experts, first, count):
  """(sort key, whether each token copy is routed to one of the experts [first, first + count)):
  a copy routed elsewhere gets key `count`, past every group."""
  local = experts - first
  mine = (local >= 0) & (local < count)
  return jnp.where(mine, local, count), mine
