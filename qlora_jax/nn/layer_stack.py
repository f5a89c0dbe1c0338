"""The decoder's stacked layers scanned with each layer's input kept in host memory and fetched
back one layer ahead in the backward pass (remat "offload_prefetch").

jax's offloading checkpoint policy ("offload") copies layer i's input back from host memory at
the start of layer i's backward, where nothing else can run: on an H100 those copies run exposed
(docs/results/diag3_h100). Here the whole stack is one custom VJP. The forward scan stores each
layer's input in pinned host memory; the backward scan (last layer first) carries layer i's
input on the device and starts copying layer i - 1's while it recomputes and differentiates
layer i, so each copy has a whole layer's work to run beside.

What the backward keeps is what "offload" keeps (each layer's input, in host memory); it
recomputes each layer's forward in full, with the same dropout masks (each layer's RNG state
before the forward is an input of the recomputation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _to_host(x):
  return jax.device_put(x, jax.memory.Space.Host)


def _to_device(x):
  return jax.device_put(x, jax.memory.Space.Device)


def scan_prefetched(apply, trainable, frozen, rng, h, xs, consts):
  """(h after the last layer, each layer's RNG state after it).

  apply(trainable_i, frozen_i, rng_i, h, x_i, consts) -> (h, rng_i'): one layer. trainable
  (the LoRA weights: gradients come back for them and for h), frozen (everything else the
  layer reads), rng (its RNG state) and xs (per-layer scanned inputs) carry a leading [layers]
  axis; consts (rotations, masks) are read by every layer."""
  return _stack(apply, trainable, frozen, rng, h, xs, consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stack(apply, trainable, frozen, rng, h, xs, consts):
  def body(h, layer):
    return apply(*layer[:3], h, layer[3], consts)
  return jax.lax.scan(body, h, (trainable, frozen, rng, xs))


def _stack_fwd(apply, trainable, frozen, rng, h, xs, consts):
  def body(h, layer):
    out, rng_out = apply(*layer[:3], h, layer[3], consts)
    return out, (_to_host(h), rng_out)
  h_out, (inputs, rng_out) = jax.lax.scan(body, h, (trainable, frozen, rng, xs))
  return (h_out, rng_out), (trainable, frozen, rng, xs, consts, inputs)


def _stack_bwd(apply, residuals, cotangents):
  trainable, frozen, rng, xs, consts, inputs = residuals
  g_h = cotangents[0]
  layers = inputs.shape[0]

  def body(carry, layer):
    g, x = carry
    i, trainable_i, frozen_i, rng_i, x_i = layer
    ahead = _to_device(jax.lax.dynamic_index_in_dim(inputs, jnp.maximum(i - 1, 0), keepdims=False))
    one = lambda t, h: apply(t, frozen_i, rng_i, h, x_i, consts)[0]  # noqa: E731
    _, pullback = jax.vjp(one, trainable_i, x)
    d_trainable, d_h = pullback(g)
    return (d_h, ahead), d_trainable

  last = _to_device(inputs[layers - 1])
  (g_h, _), d_trainable = jax.lax.scan(
      body, (g_h, last), (jnp.arange(layers), trainable, frozen, rng, xs), reverse=True)
  return d_trainable, None, None, g_h, None, None


_stack.defvjp(_stack_fwd, _stack_bwd)
