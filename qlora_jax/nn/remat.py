"""What the backward pass keeps of a decoder layer's forward (gradient checkpointing policies).

Every policy but "none" recomputes a layer's forward in the backward pass from what it kept:
  full               the layer's input, on the device
  offload            the layer's input, in pinned host memory
  offload_attention  that, and the attention's own residuals (its output and softmax statistics)
                     in host memory too, so the backward recomputes the projections but not the
                     attention: at long rows the attention's forward is the larger part of the
                     recomputation (quadratic in the row) while what it keeps is linear in it
  save_dots          the outputs of the dots without batch dimensions, on the device
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

LAYER_INPUT = "layer_input"  # each decoder layer's input
ATTENTION_RESIDUALS = "attention_residuals"  # the attention's output and softmax statistics


def _offloaded(*names: str):
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": _offloaded(LAYER_INPUT),
    "offload_attention": _offloaded(LAYER_INPUT, ATTENTION_RESIDUALS),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def with_named_residuals(attend: Callable) -> Callable:
  """attend(q, k, v, mask) -> out, differentiated through its own VJP, with the residuals that
  VJP keeps beyond q, k, v and the mask and no larger than the output (the output, the softmax
  statistics) named ATTENTION_RESIDUALS, so a policy that keeps them never re-runs cuDNN's fused
  attention forward. Larger ones ([T, S]: a mask's bias, XLA attention's probabilities) stay
  unnamed and are recomputed: quadratic in the row, they would swamp host memory. The mask
  (bool, or None) is an argument, not a closure: a custom VJP may not close over traced values."""

  @jax.custom_vjp
  def attention(q, k, v, mask):
    return attend(q, k, v, mask)

  def forward(q, k, v, mask):
    out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    named_out = checkpoint_name(out, ATTENTION_RESIDUALS)
    leaves, tree = jax.tree.flatten(pullback)
    inputs = (q, k, v, *jax.tree.leaves(mask))

    def name(x):
      if any(x is y for y in inputs):
        return x  # the inputs: recomputed from the layer's input (cheap, linear in the row)
      if x is out:
        return named_out
      if x.size > out.size:  # [T, S]-sized (a mask's bias, XLA's probabilities): not to the host
        return x
      return checkpoint_name(x, ATTENTION_RESIDUALS)

    return named_out, jax.tree.unflatten(tree, [name(x) for x in leaves])

  def backward(pullback, g):
    return (*pullback(g), None)

  attention.defvjp(forward, backward)
  return attention
