"""Next-token cross entropy with lm_head applied chunk by chunk: the [tokens, vocab] float32
logits never exist at once (each chunk's logits are recomputed in the backward)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.xla import precision_for
from qlora_jax.data.formats import IGNORE


LOGITS_BYTES = 256 * 2**20  # one chunk's float32 logits: a large vocabulary gets fewer tokens


def loss_chunk(vocab: int, requested: int = 0) -> int:
  """Tokens a chunk holds: `requested` (ModelOptions.loss_chunk) if set, else the largest power
  of two (128..2048) whose float32 logits fit LOGITS_BYTES (128256-token Llama 3 vocabulary:
  512; 32000: 2048)."""
  if requested:
    return requested
  tokens = LOGITS_BYTES // (4 * vocab)
  return max(128, min(2048, 1 << max(tokens, 1).bit_length() - 1))


def chunked_cross_entropy(h_NxD: jax.Array, w_VxD: jax.Array, labels_N: jax.Array,
                          chunk: int = 0, softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, number of counted tokens); labels == IGNORE are skipped. chunk:
  tokens whose logits exist at once (0: loss_chunk of the vocabulary). softcap: the logits are
  cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping)."""
  n = h_NxD.shape[0]
  chunk = min(loss_chunk(w_VxD.shape[0], chunk), n)
  pad = -n % chunk
  h = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, h_NxD.shape[-1])
  labels = jnp.pad(labels_N, (0, pad), constant_values=IGNORE).reshape(-1, chunk)
  w = w_VxD.astype(h_NxD.dtype)

  def body(carry, xs):
    total, count = carry
    s, c = _chunk_loss(softcap, w, *xs)
    return (total + s, count + c), None

  (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (h, labels))
  return total, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_loss(softcap, w_VxD, h_CxD, labels_C):
  """(sum of the chunk's token losses, counted tokens) against the frozen w (never
  differentiated): float32 logits of compute-dtype operands."""
  return _chunk_forward(softcap, w_VxD, h_CxD, labels_C)[0]


def _chunk_forward(softcap, w_VxD, h_CxD, labels_C):
  logits = _logits(h_CxD, w_VxD, softcap)
  valid = labels_C != IGNORE
  target = jnp.take_along_axis(logits, jnp.where(valid, labels_C, 0)[:, None], axis=-1)[:, 0]
  lse = jax.nn.logsumexp(logits, axis=-1)
  # w is a residual of every chunk, but loop-invariant: the scan keeps it once, not per chunk
  return (jnp.sum(jnp.where(valid, lse - target, 0.0)), jnp.sum(valid)), (w_VxD, h_CxD, labels_C, lse)


def _chunk_backward(softcap, residuals, cotangents):
  """d loss / d h = (softmax - onehot) @ W over counted tokens, the logits recomputed (only h,
  the labels and the log-normalisers are kept). The [C, V] factor is rounded to the compute
  dtype before the product, as a bf16 autocast backward has it, so the product is one
  compute-dtype GEMM (a float32 factor made XLA fuse the rounding into a slower GEMM). A
  softcap multiplies it by the cap's slope, 1 - (logits / cap)^2."""
  w, h, labels, lse = residuals
  valid = labels != IGNORE
  logits = _logits(h, w, softcap)
  probs = jnp.exp(logits - lse[:, None])
  onehot = jnp.arange(w.shape[0])[None, :] == jnp.where(valid, labels, -1)[:, None]
  dlogits = jnp.where(valid[:, None], probs - onehot, 0.0) * cotangents[0]
  if softcap is not None:
    dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
  dlogits = dlogits.astype(h.dtype)
  dh = jnp.einsum("cv,vd->cd", dlogits, w, preferred_element_type=jnp.float32,
                  precision=precision_for(w.dtype)).astype(h.dtype)
  return None, dh, None  # lm_head (or the tied embedding) is frozen: no cotangent


_chunk_loss.defvjp(_chunk_forward, _chunk_backward)


def _logits(h_CxD, w_VxD, softcap=None):
  logits = jnp.einsum("cd,vd->cv", h_CxD, w_VxD, preferred_element_type=jnp.float32,
                      precision=precision_for(w_VxD.dtype))
  return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def batch_loss(model, batch: dict, shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """(summed loss, token count) of a batch dict (input_ids, labels, positions; segment_ids when
  rows are packed, absent when each row is one sequence: the model's causal path;
  inputs_embeds when the embedding rows were looked up on the host).

  shards: the number of devices the batch rows are split over. Each device's rows are chunked
  on their own (a chunk never spans two devices, so no device computes another's logits).
  """
  h = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                          segment_ids=batch.get("segment_ids"), inputs_embeds=batch.get("inputs_embeds"))
  w, labels = model.head_weight(), batch["labels"]
  loss = functools.partial(chunked_cross_entropy, chunk=model.options.loss_chunk,
                           softcap=model.config.final_logit_softcapping)
  if shards == 1:
    return loss(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1))
  totals, counts = jax.vmap(loss, in_axes=(0, None, 0))(
      h.reshape(shards, -1, h.shape[-1]), w, labels.reshape(shards, -1))
  return jnp.sum(totals), jnp.sum(counts)
