"""The optimizer: AdamW after global-norm clipping, where its state lives, and its update.

The moments are float32 whatever the LoRA dtype: with bf16 LoRA weights (the qlora.py recipe)
the update is computed in float32 and rounded into the bf16 weights, as bitsandbytes' 32-bit
optimizers do. With `offload_optimizer` the state lives in pinned host memory and the update
streams it layer by layer: one layer's moments are on the device at a time (a scan over the
stacked layer axis), instead of all of them at once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qlora_jax.sharding import Layout
from qlora_jax.train_config import TrainConfig


class Optimizer(NamedTuple):
  """An optax transformation (init/update: global-norm clipping, then `inner`) that keeps its
  parts for the streamed update: clipping needs every gradient, `inner` must be elementwise."""

  init: Callable
  update: Callable
  inner: optax.GradientTransformation
  max_norm: float


def clipped(inner: optax.GradientTransformation, max_norm: float) -> Optimizer:
  """`inner` after optax.clip_by_global_norm(max_norm)."""
  chain = optax.chain(optax.clip_by_global_norm(max_norm), inner)
  return Optimizer(chain.init, chain.update, inner, max_norm)


def make_optimizer(cfg: TrainConfig) -> tuple[Optimizer, Callable]:
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
  """(new lora, new optimizer state): one clipped AdamW step.

  host: the state's pinned_host shardings when it is offloaded (None: it is on the device).
  Offloaded state of stacked layers is streamed through the device one layer at a time.
  """
  layers = _stacked_layers(lora)
  if host is not None and layers:
    return _streamed(tx, grads, opt_state, lora, host, layers)
  if host is not None:  # unstacked layers: the whole state comes in for the update
    opt_state = jax.device_put(opt_state, jax.tree.map(lambda s: s.with_memory_kind("device"), host))
  updates, opt_state = tx.update(_f32(grads), opt_state, _f32(lora))
  return optax.apply_updates(lora, updates), opt_state


def _stacked_layers(lora) -> int:
  """The length of the layer axis every LoRA leaf carries (scanned layers), else 0."""
  leaves = jax.tree.leaves(lora)
  firsts = {x.shape[0] for x in leaves if x.ndim == 3}
  return firsts.pop() if len(firsts) == 1 and all(x.ndim == 3 for x in leaves) else 0


def _streamed(tx: Optimizer, grads, opt_state, lora, host, layers: int):
  """The update as a scan over the layer axis: layer i's moments come to the device (fetched
  one iteration ahead, so the copy runs under the previous layer's update), are updated with its
  clipped gradient and go back to host memory; the LoRA is updated in place. Clipping is
  optax.clip_by_global_norm's rule with the norm of all layers."""
  clip_state, adam_state = opt_state
  norm = global_norm(grads)
  clip = lambda g: jax.lax.select(norm < tx.max_norm, g, (g / norm) * tx.max_norm)  # noqa: E731  (optax's rule)
  leaves, treedef = jax.tree.flatten(adam_state)
  homes = treedef.flatten_up_to(host[1])
  layered = [x.ndim >= 1 and x.shape[0] == layers for x in leaves]
  stacked = [(x, _per_layer(s, "device"), _per_layer(s, "pinned_host"))
             for x, s, m in zip(leaves, homes, layered) if m]
  shared = [jax.device_put(x, s.with_memory_kind("device")) for x, s, m in zip(leaves, homes, layered) if not m]

  def fetch(i):
    return [jax.device_put(x[i], on_device) for x, on_device, _ in stacked]

  def one_layer(carry, i):
    lora, moments = carry
    ahead = fetch(jnp.minimum(i + 1, layers - 1))
    parts = iter(moments), iter(shared)
    state = treedef.unflatten([next(parts[0]) if m else next(parts[1]) for m in layered])
    params = jax.tree.map(lambda x: x[i], lora)
    updates, state = tx.inner.update(jax.tree.map(lambda g: clip(g[i].astype(jnp.float32)), grads), state,
                                     _f32(params))
    lora = jax.tree.map(lambda x, p: x.at[i].set(p), lora, optax.apply_updates(params, updates))
    new = jax.tree.leaves(state)
    back = [jax.device_put(x, to_host) for x, (_, _, to_host) in zip(
        [x for x, m in zip(new, layered) if m], stacked)]
    return (lora, ahead), (back, [x for x, m in zip(new, layered) if not m])

  (lora, _), (back, rest) = jax.lax.scan(one_layer, (lora, fetch(0)), jnp.arange(layers))
  back, rest = iter(back), iter(rest)
  new = [next(back) if m else jax.device_put(next(rest)[0], s) for s, m in zip(homes, layered)]
  return lora, (clip_state, treedef.unflatten(new))


def _per_layer(sharding, kind: str):
  """The sharding of one layer's slice of a stacked array (its leading axis dropped), in `kind`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = jax.sharding.PartitionSpec(*sharding.spec[1:])
    return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=kind)
  return sharding.with_memory_kind(kind)
