"""Devices: the mesh from the config, multi-host start, and the one table of how each tensor role
is laid out over the mesh (XLA's SPMD partitioner inserts every collective; none is written here).

Mesh axes:
  data    splits the batch; parameters are replicated along it (plain data parallelism).
  fsdp    splits the batch and stores the parameters split (FSDP): each 4-bit weight is gathered,
          as 4-bit codes and 8-bit scales, just before its layer uses it.
  tensor  splits the 4-bit matmuls by output rows: a weight stays split along it when used.
  expert  splits a mixture of experts' stacked experts: each device keeps and computes its own
          experts and their LoRA (nn/expert_parallel.py); the rest of the model is replicated
          along it.

A 4-bit weight is stored as bitsandbytes does: the row-major [out, in] tensor flattened and cut
into blocks of `blocksize` elements, packed codes [n / 2] and one scale per block [n / blocksize]
(each with a leading [layers] axis when layers are scanned). Both are split along that flat axis
into equal contiguous chunks, and only when every chunk is whole blocks (n a multiple of
blocksize, the block count a multiple of the shard count): device i then holds blocks
[i * nb / S, (i + 1) * nb / S) with their own scales, and, as the flattening is row-major, whole
output rows when `out` divides too (which the tensor axis requires). The double-quant side
arrays (one float32 per 256 blocks, the offset, the codebooks) are 1/64 of the scales' bytes and
are replicated, so nested groups never need to line up with chunk edges.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qlora_jax.format.quantization import QuantizedArray
from qlora_jax.nn.expert_parallel import splits

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both
LORA_SHARDINGS = ("fsdp", "replicated")  # LoRA params and their AdamW moments
# lora_sharding="replicated": each LoRA role's layout instead (an experts' LoRA keeps its expert split)
REPLICATED_LORA = {"lora_a": "replicated", "lora_b": "replicated",
                   "expert_lora_a": "expert_lora_in_use", "expert_lora_b": "expert_lora_in_use"}

# Role -> mesh axes of each trailing dimension (leading stacked-layer axes are never split).
# The one declaration of the layout; `quant` is the flat block axis of the 4-bit codes and scales.
RULES: dict[str, tuple] = {
    "quant": (("tensor", "fsdp"),),  # codes [n/2], scales [nb]: tensor-major contiguous chunks
    "quant_in_use": (("tensor",),),  # what a layer computes with: gathered over fsdp
    "experts": (("expert", "fsdp"),),  # stacked experts [E, out, in]: whole experts per expert shard
    "experts_in_use": (("expert",),),  # each device computes with its own experts
    "vocab": (("fsdp",), None),  # embedding / lm_head [V, D], split by vocabulary rows
    "lora_a": (("fsdp",), None),  # [in, r]
    "lora_b": (None, ("fsdp",)),  # [r, out]
    "lora_in_use": (),  # gathered whole: GSPMD would otherwise move the larger activations to it
    "expert_lora_a": (("expert",), ("fsdp",), None),  # an experts' LoRA A [E, in, r]
    "expert_lora_b": (("expert",), None, ("fsdp",)),  # B [E, r, out]
    "expert_lora_in_use": (("expert",), None, None),  # each device's experts' adapters only
    "batch": (BATCH_AXES,),  # [B, ...] rows of a batch
    "replicated": (),  # norms, biases, RNG state, optimizer counts, double-quant side arrays
}


def mesh_shape(mesh: tuple[tuple[str, int], ...], device_count: int) -> dict[str, int]:
  """{axis: size} of a config's mesh on `device_count` devices (-1: what is left); ValueError
  naming the problem otherwise. The mesh may use fewer devices than there are."""
  names = [a for a, _ in mesh]
  if len(set(names)) != len(names) or not set(names) <= set(MESH_AXES):
    raise ValueError(f"mesh {_text(mesh)}: axes must be distinct, among {MESH_AXES}")
  free = [a for a, s in mesh if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {_text(mesh)}: at most one axis may be -1")
  fixed = math.prod(s for _, s in mesh if s != -1)
  sizes = {a: (device_count // fixed if s == -1 else s) for a, s in mesh}
  if math.prod(sizes.values()) > device_count or 0 in sizes.values() or (free and device_count % fixed):
    raise ValueError(
        f"mesh {_text(mesh)} needs {fixed if not free else f'a multiple of {fixed}'} devices; "
        f"{device_count} {jax.default_backend()} device(s) are visible. Choose a mesh that fits "
        "(mesh=data:-1 uses them all; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "simulates 8 devices)")
  return sizes


def _text(mesh) -> str:
  return ",".join(f"{a}:{s}" for a, s in mesh)


def make_mesh(mesh: tuple[tuple[str, int], ...]) -> jax.sharding.Mesh:
  """The device mesh of a config (GSPMD-partitioned axes) over the first devices it needs."""
  sizes = mesh_shape(mesh, jax.device_count())
  n = math.prod(sizes.values())
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def distributed_settings(env: Mapping[str, str]) -> dict | None:
  """jax.distributed.initialize arguments when the environment is a multi-process job, else None.

  Explicit: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID). Detected by JAX
  itself: a Cloud TPU slice of several hosts (TPU_WORKER_HOSTNAMES lists more than one), SLURM
  or Open MPI jobs of more than one task. One host (a TPU v5e-8, a GPU box) needs nothing.
  """
  if env.get("JAX_COORDINATOR_ADDRESS"):
    settings = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if env.get(key):
        settings[name] = int(env[key])
    return settings
  several = (len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
             or int(env.get("SLURM_NTASKS", "1") or 1) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
  return {} if several else None


def initialize_distributed(env: Mapping[str, str] = os.environ) -> bool:
  """Join the multi-process job the environment describes (before any device is touched)."""
  settings = distributed_settings(env)
  if settings is None or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(**settings)
  return True


def _split(axes, dim: int, sizes: Mapping[str, int]):
  """The mesh axes (of size > 1) that split a dimension of size dim, as a spec entry; None when
  there are none or they do not divide it."""
  used = tuple(a for a in (axes or ()) if sizes.get(a, 1) > 1)
  if not used or dim % math.prod(sizes[a] for a in used):
    return None
  return used if len(used) > 1 else used[0]


def _fit(rule: tuple, shape: tuple[int, ...], sizes: Mapping[str, int]) -> P:
  """The rule's spec for this shape: its trailing dimensions split where the axes divide them,
  leading (stacked-layer) dimensions whole; P() when nothing is split."""
  dims = [_split(axes, dim, sizes) for axes, dim in zip(rule, shape[len(shape) - len(rule):])]
  if all(d is None for d in dims):
    return P()
  return P(*([None] * (len(shape) - len(dims))), *dims)


def quant_specs(qa: QuantizedArray, sizes: Mapping[str, int], in_use: bool = False) -> QuantizedArray:
  """PartitionSpecs of a (possibly stacked) QuantizedArray's leaves: codes and scales split along
  the flat block axis when every chunk is whole blocks (and whole rows for `tensor`)."""
  whole = qa.size % qa.blocksize == 0 and qa.shape[0] % sizes.get("tensor", 1) == 0
  axes = RULES["quant_in_use" if in_use else "quant"][0]
  if splits(qa, sizes.get("expert", 1)):
    axes = RULES["experts_in_use" if in_use else "experts"][0]
  flat = _split(axes, qa.num_blocks, sizes) if whole else None
  blocks = lambda x: P() if flat is None else P(*([None] * (x.ndim - 1)), flat)  # noqa: E731
  whole_leaf = lambda x: None if x is None else P()  # noqa: E731
  return qa.replace(codes=blocks(qa.codes), absmax=blocks(qa.absmax), quant_map=P(),
                    nested_absmax=whole_leaf(qa.nested_absmax),
                    nested_quant_map=whole_leaf(qa.nested_quant_map), offset=whole_leaf(qa.offset))


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def role(var: nnx.Variable | None, path) -> str:
  """The layout role of a variable (None: a plain array, e.g. an optimizer step count)."""
  names = _names(path)
  if isinstance(var, nnx.LoRAParam) and names[-1] in ("lora_a", "lora_b"):
    return ("expert_" if len(names) >= 3 and names[-3] == "experts" else "") + names[-1]
  # the frozen [V, D] matrices (model variables only: optimizer moments are LoRAParams)
  if (isinstance(var, nnx.Variable) and not isinstance(var, nnx.LoRAParam) and len(names) >= 2
      and names[-2:] in (["embed_tokens", "weight"], ["lm_head", "weight"])):
    return "vocab"
  return "replicated"


def var_specs(var: nnx.Variable, path, sizes: Mapping[str, int], lora_sharding: str = "fsdp"):
  """The Variable with a PartitionSpec in place of each leaf of its value."""
  value = var.get_raw_value()
  if isinstance(value, QuantizedArray):
    return var.copy(quant_specs(value, sizes))
  r = role(var, path)
  if lora_sharding == "replicated":
    r = REPLICATED_LORA.get(r, r)
  return jax.tree.map(lambda leaf: _fit(RULES[r], leaf.shape, sizes), var)


def specs(tree, sizes: Mapping[str, int], lora_sharding: str = "fsdp"):
  """A tree of PartitionSpecs for a tree of nnx Variables / arrays (concrete or abstract):
  a model state, an optimizer state (its moments are LoRAParam variables), or a mix."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: var_specs(x, path, sizes, lora_sharding) if isinstance(x, nnx.Variable) else P(),
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_device_bytes(tree, tree_specs, sizes: Mapping[str, int]) -> int:
  """Bytes one device holds of `tree` laid out by `tree_specs`."""
  total = 0
  for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_specs)):
    shards = math.prod(sizes[a] for dim in spec for a in ((dim,) if isinstance(dim, str) else dim or ()))
    total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize // shards
  return total


def gather_for_use(value, in_use: str = "lora_in_use"):
  """A split weight as a layer computes with it. Under a mesh (the jitted steps trace under one),
  a 4-bit weight is gathered over `fsdp` as codes and scales (4-bit bytes move, not bf16) and
  stays split over `tensor`; a LoRA matrix is laid out by the `in_use` rule (whole; an experts'
  LoRA stays split over `expert`). Without a mesh (one device): returned as it is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return value
  sizes = dict(mesh.shape)
  if isinstance(value, QuantizedArray):
    return jax.lax.with_sharding_constraint(value, quant_specs(value, sizes, in_use=True))
  return jax.lax.with_sharding_constraint(value, _fit(RULES[in_use], value.shape, sizes))


@dataclasses.dataclass(frozen=True)
class Layout:
  """The mesh plus the LoRA choice: shardings of model state, optimizer state and batches."""

  mesh: jax.sharding.Mesh
  lora_sharding: str = "fsdp"

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  @property
  def batch_shards(self) -> int:
    return batch_shards(self.sizes)

  def shardings(self, tree):
    """NamedShardings for every leaf of tree (same structure)."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs(tree, self.sizes, self.lora_sharding))

  def value_shardings(self, var: nnx.Variable, path, value):
    """NamedShardings for `value` (arrays or a QuantizedArray) stored in the variable at path."""
    spec = var_specs(var.copy(value), path, self.sizes, self.lora_sharding).get_raw_value()
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), spec)

  def put(self, tree):
    return jax.device_put(tree, self.shardings(tree))

  def batch_sharding(self, ndim: int, leading: int = 0) -> NamedSharding:
    """Rows (after `leading` axes, e.g. micro-batches) split over data x fsdp."""
    axes = tuple(a for a in RULES["batch"][0] if self.sizes.get(a, 1) > 1) or None
    return NamedSharding(self.mesh, P(*([None] * leading), axes, *([None] * (ndim - leading - 1))))

  def put_batch(self, batch: dict[str, np.ndarray], leading: int = 0) -> dict[str, jax.Array]:
    """A host batch as global arrays; each process supplies the rows of its own devices."""
    return {k: jax.make_array_from_callback(v.shape, self.batch_sharding(v.ndim, leading),
                                            lambda index, v=v: v[index]) for k, v in batch.items()}

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def batch_shards(sizes: dict[str, int]) -> int:
  """How many ways a mesh of `sizes` ({axis: size}) splits a batch: over data x fsdp."""
  return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def make_layout(mesh: tuple[tuple[str, int], ...], lora_sharding: str = "fsdp") -> Layout | None:
  """The Layout of a config's mesh, or None when it has one device (the unsharded path)."""
  built = make_mesh(mesh)
  return None if built.size == 1 else Layout(built, lora_sharding)
