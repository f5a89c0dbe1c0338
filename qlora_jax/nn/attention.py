"""Scaled dot-product attention as the decoder uses it: which implementation, the masks, and the
softcapped form cuDNN does not have.

q [B, T, N, H] against k, v [B, S, KV, H] (grouped: N a multiple of KV). A mask is bool
[B, T, S]; None means causal, which cuDNN's kernel computes without one.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.gpu import is_hopper
from pallas_kernels.xla import precision_for
from qlora_jax.nn.remat import with_named_residuals

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(requested: str, dtype: str, head_dim: int, softcap: float | None = None) -> str:
  """"auto": cuDNN flash attention on a GPU for 16-bit compute and head_dim a multiple of 8 up to
  cudnn_head_dim_limit() (what it supports; faster training: docs/BENCHMARKS.md, "Attention
  implementation"), XLA elsewhere. Softcapped scores (Gemma 2) have no cuDNN kernel: XLA, said
  once."""
  if softcap is not None:
    if requested == "cudnn" or (requested == "auto" and jax.default_backend() == "gpu"):
      say_once("attention: XLA (cuDNN has no logit softcapping, which this model uses)")
    return "xla"
  if requested != "auto":
    return requested
  if jax.default_backend() != "gpu":
    return "xla"
  fits = dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= cudnn_head_dim_limit()
  return "cudnn" if fits else "xla"


def cudnn_head_dim_limit() -> int:
  """The widest head cuDNN's flash kernels train here: 256 on Hopper (sm_90+: Gemma 3's heads,
  trained through cuDNN on an H100 in docs/BENCHMARKS.md), 128 on earlier GPUs."""
  return 256 if is_hopper() else 128


@functools.cache
def say_once(line: str) -> None:
  print(f"qlora_jax: {line}", file=sys.stderr)


def make_mask(q_slot_BxT, k_slot_BxS, k_valid_BxS, q_segment_BxT=None, k_segment_BxS=None,
              window: int | None = None) -> jax.Array:
  """bool [B, T, S]: causal by slot, only real keys, same packed segment, within the window."""
  mask = (k_slot_BxS[:, None, :] <= q_slot_BxT[:, :, None]) & k_valid_BxS[:, None, :]
  if q_segment_BxT is not None:
    mask &= q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
  if window is not None:
    mask &= (q_slot_BxT[:, :, None] - k_slot_BxS[:, None, :]) < window
  return mask


def attend(q, k, v, mask, *, implementation: str, scale: float, window: int | None = None,
           softcap: float | None = None, name_residuals: bool = False) -> jax.Array:
  """Attention output [B, T, N, H] in q's dtype. window: causal within `window` tokens (with
  mask None). name_residuals: the residuals named for remat="offload_attention". implementation
  "decode": a generation step's (one query against the KV cache, masked): one kernel launch where
  dispatch.decode_attention takes it (a Hopper GPU), XLA's otherwise."""
  if implementation == "decode":
    if mask is not None and softcap is None and window is None:
      out = dispatch.decode_attention(q, k, v, mask, scale)
      if out is not None:
        return out
    implementation = "xla"

  def core(q, k, v, mask):
    if softcap is not None:
      return _softcapped(q, k, v, mask, scale, softcap, window)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None], is_causal=mask is None, scale=scale,
        local_window_size=(window - 1, 0) if mask is None and window else None,
        implementation=implementation)

  fn = with_named_residuals(core) if name_residuals else core
  # dot_product_attention takes no precision argument: float32 asks for it by context
  full = precision_for(q.dtype) == jax.lax.Precision.HIGHEST
  with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
    return fn(q, k.astype(q.dtype), v.astype(q.dtype), mask)


SOFTCAP_QUERY_CHUNK = 512  # queries whose float32 scores exist at once in the softcapped form


def _softcapped(q, k, v, mask, scale: float, cap: float, window: int | None = None,
                chunk: int = SOFTCAP_QUERY_CHUNK) -> jax.Array:
  """softmax(cap * tanh(q k^T * scale / cap), masked) v, the scores and softmax in float32
  (mask None: causal, within `window` tokens if set). Rows longer than `chunk` queries go
  through in pieces of `chunk`, each rematerialized in the backward, so the [B, N, T, S] float32
  scores never exist whole: [B, N, chunk, S] at a time."""
  t = q.shape[1]
  if t <= chunk:
    return _softcapped_block(q, k, v, mask, 0, scale, cap, window)
  pieces = -(-t // chunk)
  pad = pieces * chunk - t
  qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qs = qs.reshape(q.shape[0], pieces, chunk, *q.shape[2:]).swapaxes(0, 1)
  masks = None
  if mask is not None:
    masks = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)), constant_values=True)
    masks = masks.reshape(mask.shape[0], pieces, chunk, -1).swapaxes(0, 1)

  @jax.checkpoint
  def piece(args):
    q_piece, mask_piece, start = args
    return _softcapped_block(q_piece, k, v, mask_piece, start, scale, cap, window)

  out = jax.lax.map(piece, (qs, masks, jnp.arange(pieces) * chunk))  # [pieces, B, chunk, N, H]
  return out.swapaxes(0, 1).reshape(q.shape[0], pieces * chunk, *q.shape[2:])[:, :t]


def _softcapped_block(q, k, v, mask, start, scale: float, cap: float, window: int | None):
  """_softcapped for the queries at slots start .. start + T - 1 (mask: theirs, or None)."""
  b, t, n, h = q.shape
  kv, s = k.shape[2], k.shape[1]
  q = q.reshape(b, t, kv, n // kv, h)
  prec = precision_for(q.dtype)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32, precision=prec)
  scores = cap * jnp.tanh(scores * scale / cap)
  if mask is None:
    q_slots, k_slots = start + jnp.arange(t), jnp.arange(s)
    mask = make_mask(q_slots[None], k_slots[None], jnp.ones((1, s), bool), window=window)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32, precision=prec)
  return out.reshape(b, t, n, h).astype(v.dtype)
