"""The chunked lm_head + cross entropy against float64 numpy: value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.data.formats import IGNORE
from qlora_jax.train.loss import chunked_cross_entropy


def _reference(h, w, labels, softcap=None):
  """(sum of token losses, count, d sum / d h) in float64."""
  h, w = h.astype(np.float64), w.astype(np.float64)
  raw = h @ w.T
  logits = raw if softcap is None else softcap * np.tanh(raw / softcap)
  logits = logits - logits.max(-1, keepdims=True)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  valid = labels != IGNORE
  safe = np.where(valid, labels, 0)
  losses = -np.log(p[np.arange(len(labels)), safe])
  dlogits = p.copy()
  dlogits[np.arange(len(labels)), safe] -= 1.0
  dlogits[~valid] = 0.0
  if softcap is not None:
    dlogits *= 1.0 - np.tanh(raw / softcap) ** 2
  return losses[valid].sum(), valid.sum(), dlogits @ w


@pytest.mark.parametrize("dtype, rtol, softcap", [(np.float32, 2e-5, None), (jnp.bfloat16, 3e-2, None),
                                                   (np.float32, 2e-5, 1.5)])
def test_chunked_cross_entropy_value_and_gradient(dtype, rtol, softcap):
  """37 tokens in chunks of 8 (the last chunk padded), every fifth label ignored: the summed
  loss, the count and d loss / d h equal float64 numpy's (bf16 operands: within bf16's error),
  with and without Gemma 2's final-logit softcap (a cap of 1.5 bends these logits hard)."""
  rng = np.random.default_rng(0)
  h = (rng.standard_normal((37, 24)) * 0.5).astype(np.float32)
  w = (rng.standard_normal((50, 24)) * 0.5).astype(np.float32)
  labels = rng.integers(0, 50, 37).astype(np.int32)
  labels[::5] = IGNORE
  hd, wd = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
  ref_loss, ref_count, ref_dh = _reference(np.asarray(hd, np.float32), np.asarray(wd, np.float32), labels,
                                           softcap)

  def loss(h_):
    return chunked_cross_entropy(h_, wd, jnp.asarray(labels), chunk=8, softcap=softcap)

  (total, count), vjp = jax.vjp(loss, hd)
  (dh,) = vjp((jnp.float32(1.0), np.zeros((), jax.dtypes.float0)))
  assert int(count) == ref_count
  np.testing.assert_allclose(float(total), ref_loss, rtol=rtol)
  scale = np.abs(ref_dh).max()
  np.testing.assert_allclose(np.asarray(dh, np.float32), ref_dh, atol=rtol * scale)
