"""The optimizer: AdamW after global-norm clipping, where its state lives, and its update.

The moments are float32 whatever the LoRA dtype: with bf16 LoRA weights (the qlora.py recipe)
the update is computed in float32 and rounded into the bf16 weights, as bitsandbytes' 32-bit
optimizers do. With `offload_optimizer` the state lives in pinned host memory; with stacked
(scanned) layers it is a HostState, chunks of layers that stream through the device after the
gradients are known, a few chunks' moments on the device at a time instead of all of them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax.nn.sharding import Layout
from qlora_jax.train.config import OptimConfig


class Optimizer(NamedTuple):
  """An optax transformation (init/update: global-norm clipping, then `inner`) that keeps its
  parts for the streamed update: clipping needs every gradient, `inner` must be elementwise."""

  init: Callable
  update: Callable
  inner: optax.GradientTransformation
  max_norm: float


def clipped(inner: optax.GradientTransformation, max_norm: float) -> Optimizer:
  """`inner` after optax.clip_by_global_norm(max_norm); max_norm 0: no clipping."""
  max_norm = max_norm or math.inf
  chain = optax.chain(optax.clip_by_global_norm(max_norm), inner)
  return Optimizer(chain.init, chain.update, inner, max_norm)


def make_optimizer(cfg: OptimConfig) -> tuple[Optimizer, Callable]:
  """(AdamW with clipping, its learning-rate schedule: warmup then constant, linear or cosine)."""
  warmup = int(cfg.warmup_ratio * cfg.steps)
  after = {"constant": optax.constant_schedule(cfg.learning_rate),
           "linear": optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.steps - warmup)),
           "cosine": optax.cosine_decay_schedule(cfg.learning_rate, max(1, cfg.steps - warmup))}[cfg.lr_schedule]
  schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, max(1, warmup)), after],
                                  [warmup]) if warmup else after
  adamw = optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, weight_decay=cfg.weight_decay)
  return clipped(adamw, cfg.max_grad_norm), schedule


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_optimizer(tx: Optimizer, lora, layout: Layout | None = None):
  """The optimizer state of lora (float32 moments), created in the layout if any."""
  init = lambda params: tx.init(_f32(params))  # noqa: E731
  if layout is None:
    return jax.jit(init)(lora)
  return jax.jit(init, out_shardings=layout.shardings(jax.eval_shape(init, lora)))(lora)


def offload_sharding(opt_state, layout: Layout | None = None):
  """pinned_host shardings for the optimizer state (the design's paged-optimizer replacement),
  split as the layout splits it on the devices."""
  if layout is not None:
    return jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), layout.shardings(opt_state))
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  return jax.tree.map(lambda _: host, opt_state)


def global_norm(grads) -> jax.Array:
  """The norm of all gradients, summed in float32 (inside jit the casts fuse into the sums)."""
  return optax.tree.norm(_f32(grads))


def apply_update(tx: Optimizer, grads, opt_state, lora, host=None):
  """(new lora, new optimizer state): one clipped AdamW step, inside the jitted step.

  host: the state's pinned_host shardings when it is offloaded whole (None: on the device); the
  state comes to the device for the update. Offloaded moments of stacked layers take
  `make_streamed_update` instead, outside the jitted step (a HostState).
  """
  if host is not None:
    opt_state = jax.device_put(opt_state, jax.tree.map(lambda s: s.with_memory_kind("device"), host))
  updates, opt_state = tx.update(_f32(grads), opt_state, _f32(lora))
  return optax.apply_updates(lora, updates), opt_state


def stacked_layers(lora) -> int:
  """The length of the layer axis every LoRA leaf carries (scanned layers), else 0."""
  leaves = jax.tree.leaves(lora)
  firsts = {x.shape[0] for x in leaves if x.ndim == 3}
  return firsts.pop() if len(firsts) == 1 and all(x.ndim == 3 for x in leaves) else 0


CHUNK_BYTES = 320 * 2**20  # moments per transfer: 4 layers at 65B (the best of 4/8/16 layers measured)


@jax.tree_util.register_pytree_node_class
class HostState:
  """An optimizer state offloaded to pinned host memory in chunks of layers.

  The layered leaves (AdamW's moments, [layers, ...]) are split into chunks along the layer axis,
  each chunk its own host arrays, so a chunk crosses PCIe as one runtime transfer: the next
  chunk's fetch and the previous chunk's write-back then run at once, one each way (XLA's copies
  inside one program run one after the other: docs/BENCHMARKS.md, "Streamed update").
  The other leaves (step counts) are `shared`. `stacked()` gives optax's own state back.
  """

  def __init__(self, shared: list, chunks: list[list], treedef, layered: tuple[bool, ...],
               bounds: tuple[tuple[int, int], ...]):
    self.shared, self.chunks = shared, chunks
    self.treedef, self.layered, self.bounds = treedef, layered, bounds

  def tree_flatten(self):
    return (self.shared, self.chunks), (self.treedef, self.layered, self.bounds)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def stacked(self):
    """optax's state (layered leaves whole again, as host numpy arrays): what a checkpoint holds."""
    shared, per_leaf = iter(jax.device_get(self.shared)), zip(*jax.device_get(self.chunks))
    joined = iter([np.concatenate(parts) for parts in per_leaf])
    return self.treedef.unflatten([next(joined) if m else next(shared) for m in self.layered])


def offload(opt_state, host, lora, chunk_layers: int | None = None):
  """The state in pinned host memory (`host`: offload_sharding's tree): a HostState when the
  LoRA has stacked layers (its update streams chunk by chunk), else the state as it is, moved."""
  layers = stacked_layers(lora)
  if not layers:
    return jax.device_put(opt_state, host)
  leaves, treedef = jax.tree.flatten(opt_state)
  homes = treedef.flatten_up_to(host)
  layered = tuple(x.ndim >= 1 and x.shape[0] == layers for x in leaves)
  if chunk_layers is None:
    per_layer = sum(x.nbytes for x, m in zip(leaves, layered) if m) // layers
    chunk_layers = max(1, min(layers, CHUNK_BYTES // max(per_layer, 1)))
  bounds = tuple((lo, min(lo + chunk_layers, layers)) for lo in range(0, layers, chunk_layers))
  chunks = [[jax.device_put(x[lo:hi], h) for x, h, m in zip(leaves, homes, layered) if m] for lo, hi in bounds]
  shared = [jax.device_put(x, h) for x, h, m in zip(leaves, homes, layered) if not m]
  return HostState(shared, chunks, treedef, layered, bounds)


def make_streamed_update(tx: Optimizer):
  """update(lora, grads, norm, state: HostState) -> (lora, state), run from Python.

  Per chunk of layers: its moments come to the device (a runtime transfer, issued two chunks
  ahead once the write-back of the chunk two behind has finished), one jitted program applies optax's clip rule with the global norm and `tx.inner` to the
  chunk's slices and writes the LoRA in place (donated), and the new moments go back to host
  memory (a runtime transfer the other way). One program serves every chunk of one size.
  """

  def one_chunk(lora, grads, norm, shared, moments, start, treedef, layered):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, moments[0].shape[0])  # noqa: E731
    clip = lambda g: jax.lax.select(norm < tx.max_norm, g, (g / norm) * tx.max_norm)  # noqa: E731  (optax's rule)
    parts = iter(moments), iter(shared)
    clip_state, inner = treedef.unflatten([next(parts[0]) if m else next(parts[1]) for m in layered])
    params = jax.tree.map(take, lora)
    updates, inner = tx.inner.update(jax.tree.map(lambda g: clip(take(g).astype(jnp.float32)), grads),
                                     inner, _f32(params))
    lora = jax.tree.map(lambda x, p: jax.lax.dynamic_update_slice_in_dim(x, p, start, 0), lora,
                        optax.apply_updates(params, updates))
    new = jax.tree.leaves((clip_state, inner))
    return lora, [x for x, m in zip(new, layered) if not m], [x for x, m in zip(new, layered) if m]

  program = jax.jit(one_chunk, donate_argnums=(0,), static_argnames=("treedef", "layered"))

  def to_device(xs):
    return [jax.device_put(x, x.sharding.with_memory_kind("device")) for x in xs]

  def update(lora, grads, norm, state: HostState):
    homes = [x.sharding for x in state.chunks[0]]
    shared, fetched = to_device(state.shared), [to_device(c) for c in state.chunks[:2]]
    chunks, new_shared = [], []
    for i, (lo, _) in enumerate(state.bounds):
      if i + 2 < len(state.chunks):
        if i >= 2:  # dispatch runs ahead of the device: bound what is on it to ~4 chunks
          jax.block_until_ready(chunks[i - 2])
        fetched.append(to_device(state.chunks[i + 2]))
      lora, out_shared, moments = program(lora, grads, norm, shared, fetched[i], jnp.int32(lo),
                                          treedef=state.treedef, layered=state.layered)
      fetched[i] = None  # its device copy can go once the program has read it
      chunks.append([jax.device_put(x, h) for x, h in zip(moments, homes)])
      new_shared = new_shared or out_shared  # every chunk counts the same step
    shared = [jax.device_put(x, old.sharding) for x, old in zip(new_shared, state.shared)]
    return lora, HostState(shared, chunks, state.treedef, state.layered, state.bounds)

  update.program = program
  return update
