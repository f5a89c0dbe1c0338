"""The pure, jitted training step (its optimizer: optimizer.py).

The step is a function of (LoRA params, RNG state, optimizer state, frozen base, batch): only the
first three change, and they are donated (a host-resident state is not: donation does not alias
across memory kinds); the frozen 4-bit base is never differentiated. With a
Layout (nn/sharding.py) the same step is jitted with the layout's shardings and traced under its
mesh; without one it runs on the default device exactly as it always has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.nn.moe import router_aux_loss
from qlora_jax.train.loss import batch_loss
from qlora_jax.train.optimizer import HostState, Optimizer, apply_update, global_norm, make_streamed_update
from qlora_jax.nn.sharding import Layout


def to_device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def make_train_step(graphdef, tx: Optimizer, opt_sharding=None, layout: Layout | None = None, like=None):
  """The step: accumulate gradients over the leading micro-batch axis, one update.

  step(lora, rng, opt_state, frozen, batch) -> (lora, rng, opt_state, metrics). With the state on
  the device, or offloaded whole (opt_sharding), it is one jitted program; with a HostState
  (offloaded moments of stacked layers, optimizer.offload) a jitted program computes loss and
  gradients and the update streams the moments chunk by chunk (optimizer.make_streamed_update).
  `step.programs` holds the jitted programs.

  Args:
    opt_sharding: pinned-host shardings of the optimizer state (offload), or None.
    layout: the device layout (None: one device). With it, `like` = (lora, rng, opt_state,
      frozen), arrays or abstract, whose layout shardings the step takes and keeps.
  """
  shards = layout.batch_shards if layout is not None else 1

  def loss_fn(lora, rng, frozen, micro):
    # Rebuild the Variables at this trace level (tree.map re-creates them), so dropout may
    # advance the RNG count here; Variables made at an outer level refuse mutation.
    model = nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (lora, rng, frozen)))
    total, count = batch_loss(model, micro, shards)
    if model.options.router_aux_loss:  # per token of the micro-batch, as the mean loss is
      total = total + model.options.router_aux_loss * router_aux_loss(model) * count
    return total, (count, nnx.state(model, nnx.RngState))

  def micro_grads(lora, rng, frozen, micro):
    (total, (count, rng)), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora, rng, frozen, micro)
    return total, count, grads, rng

  def gradients(lora, rng, frozen, batch):
    def accumulate(carry, micro):
      grads, rng, total, count = carry
      t, c, g, rng = micro_grads(lora, rng, frozen, micro)
      return (jax.tree.map(jnp.add, grads, g), rng, total + t, count + c), None

    if batch["input_ids"].shape[0] == 1:  # one micro-batch: no accumulator to hold
      total, count, grads, rng = micro_grads(lora, rng, frozen, jax.tree.map(lambda x: x[0], batch))
    else:  # gradients accumulate in the LoRA dtype, as PyTorch's .grad does
      zeros = jax.tree.map(jnp.zeros_like, lora)
      (grads, rng, total, count), _ = jax.lax.scan(accumulate, (zeros, rng, 0.0, 0), batch)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    return grads, rng, {"loss": total / denom, "tokens": count, "grad_norm": global_norm(grads)}

  def whole(lora, rng, opt_state, frozen, batch):
    grads, rng, metrics = gradients(lora, rng, frozen, batch)
    lora, opt_state = apply_update(tx, grads, opt_state, lora, opt_sharding)
    return lora, rng, opt_state, metrics

  # Donation does not alias across memory kinds: host-resident optimizer state is not donated.
  donate = (0, 1, 2) if opt_sharding is None else (0, 1)
  if layout is None:  # one device: only an offloaded state's placement is spelled out
    whole_step = jax.jit(whole, donate_argnums=donate, in_shardings=(None, None, opt_sharding, None, None),
                         out_shardings=(None, None, opt_sharding, None))
    grads_step = jax.jit(gradients, donate_argnums=(1,))
  else:
    lora_s, rng_s, opt_s, frozen_s = layout.shardings(like)
    opt_s = opt_s if opt_sharding is None else opt_sharding
    batch_s = layout.batch_sharding(3, leading=1)
    whole_step = jax.jit(in_mesh(whole, layout), donate_argnums=donate,
                         in_shardings=(lora_s, rng_s, opt_s, frozen_s, batch_s),
                         out_shardings=(lora_s, rng_s, opt_s, layout.replicated()))
    grads_step = jax.jit(in_mesh(gradients, layout), donate_argnums=(1,),
                         in_shardings=(lora_s, rng_s, frozen_s, batch_s),
                         out_shardings=(lora_s, rng_s, layout.replicated()))
  streamed = make_streamed_update(tx)

  def step(lora, rng, opt_state, frozen, batch):
    if not isinstance(opt_state, HostState):
      return whole_step(lora, rng, opt_state, frozen, batch)
    # Placed where they are: arrays a model was built with are uncommitted, the programs' outputs
    # are committed, and each kind compiles its own program (two extra compiles otherwise).
    lora, rng = jax.device_put((lora, rng), jax.tree.map(lambda x: x.sharding, (lora, rng)))
    grads, rng, metrics = grads_step(lora, rng, frozen, batch)
    lora, opt_state = streamed(lora, grads, metrics["grad_norm"], opt_state)
    return lora, rng, opt_state, metrics

  step.programs = {"whole": whole_step, "gradients": grads_step, "update": streamed.program}
  return step


def in_mesh(fn, layout: Layout):
  """fn traced under the layout's mesh: its 4-bit weights are gathered where they are used."""
  def traced(*args):
    with jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh):
      return fn(*args)
  return traced


def make_eval_step(graphdef, layout: Layout | None = None):
  """(summed loss, token count) of a batch, dropout off; traced under the layout's mesh if any."""
  shards = layout.batch_shards if layout is not None else 1

  def eval_step(lora, rng, frozen, batch):
    return batch_loss(nnx.merge(graphdef, lora, rng, frozen), batch, shards)
  return jax.jit(eval_step if layout is None else in_mesh(eval_step, layout))
