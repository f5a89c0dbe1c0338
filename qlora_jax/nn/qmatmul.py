"""The frozen 4-bit base matmul y = x @ dequant(W)^T behind one custom VJP.

The backward returns dX = dY @ dequant(W) and no cotangent for the frozen weight, and saves
nothing but the quantized weight itself: no full-precision copy of W lives between forward and
backward. Which code computes the two products is a `Backend` (pallas_kernels.backends).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.backends import DEFAULT, Backend, MatmulFn, get_backend
from pallas_kernels.xla import compute_dot
from qlora_jax.format.quantization import QuantizedArray


def check_backend(backend: Backend) -> Backend:
  """The backend itself; ValueError when given anything else (a name: resolve it first)."""
  if not isinstance(backend, Backend):
    raise ValueError(f"backend must be a pallas_kernels.backends.Backend, got {backend!r}; "
                     "turn a name into one with get_backend(name)")
  return backend


def qmatmul(x: jax.Array, qw: QuantizedArray, backend: Backend = get_backend(DEFAULT),
            compute_dtype=jnp.bfloat16) -> jax.Array:
  """y [..., N] in compute_dtype = x [..., K] @ dequant(qw)^T: compute_dtype operands, float32
  accumulation, one rounding.

  Differentiable in x only: the gradient is dx = dy @ dequant(qw), in x's dtype.
  """
  return _qmatmul(x, qw, check_backend(backend), jnp.dtype(compute_dtype), jnp.dtype(x.dtype))


def _apply(fn: MatmulFn, x: jax.Array, qw: QuantizedArray, compute_dtype) -> jax.Array:
  """Run a 2-D backend function over any leading dims of x; the result in compute_dtype."""
  lead = x.shape[:-1]
  y = fn(x.reshape(-1, x.shape[-1]), qw, compute_dtype).astype(compute_dtype)
  return y.reshape(*lead, y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmatmul(x, qw, backend: Backend, compute_dtype, x_dtype):
  return _apply(backend.forward, x, qw, compute_dtype)


def _qmatmul_fwd(x, qw, backend, compute_dtype, x_dtype):
  # The only residual is the quantized weight, which is resident anyway; x is not saved.
  return _qmatmul(x, qw, backend, compute_dtype, x_dtype), qw


def _qmatmul_bwd(backend, compute_dtype, x_dtype, qw, dy):
  dx = _apply(backend.backward, dy, qw, compute_dtype)
  return dx.astype(x_dtype), None  # None: no cotangent for the frozen weight


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _update_grads(h_HxR, b, dy, compute_dtype) -> tuple:
  """(dh [H, r], db) of an update h @ b added to a product whose cotangent is dy [..., N] (M rows;
  h's rows past M reached no output: zero cotangent)."""
  dy_MxN = dy.reshape(-1, dy.shape[-1])
  m = dy_MxN.shape[0]
  dh = compute_dot("mn,rn->mr", dy_MxN, b, compute_dtype).astype(h_HxR.dtype)
  dh = jnp.pad(dh, ((0, h_HxR.shape[0] - m), (0, 0)))
  db = compute_dot("mr,mn->rn", h_HxR[:m], dy_MxN, compute_dtype).astype(b.dtype)
  return dh, db


def fuses_group(x: jax.Array, qws: tuple, rank: int, backend: Backend, compute_dtype) -> bool:
  """Whether qmatmul_group can take x [..., K] @ each of qws^T (one or more, with rank-`rank` LoRA
  updates, 0: none) in one launch."""
  rows = math.prod(x.shape[:-1])
  return backend.group_fusion is not None and backend.group_fusion[0](rows, qws, compute_dtype, rank)


def qmatmul_group(x: jax.Array, h: jax.Array | None, qws: tuple, bs: tuple | None,
                  backend: Backend, compute_dtype=jnp.bfloat16) -> tuple:
  """(y_i [..., N_i] = x @ dequant(qws[i])^T (+ h_i @ bs[i]), ...) in one launch (where
  fuses_group says so): the layers that share an input (q, k, v; gate, up; or a layer alone) as
  one kernel, each base product and its update h_i @ b_i [r, N_i] accumulated in float32 and
  rounded once to compute_dtype (qmatmul's products where h and bs are None). h: the updates'
  inputs side by side, h_i = h[..., i * r:(i + 1) * r] (one A product of the layers' A side by
  side, read in place): [..., G * r] with x's rows, or [H, G * r] with H >= x's rows, whose rows
  past x's reach no output (a one-row x's broadcast A product, `xla.broadcast_dot`, read as it
  is). Differentiable in x, h and bs: dx = sum_i dy_i @ dequant(qw_i), dh_i = dy_i @ b_i^T (zero
  in h's rows past x's), db_i = h_i^T dy_i."""
  return _qmatmul_group(x, h, tuple(qws), bs, check_backend(backend), jnp.dtype(compute_dtype),
                        jnp.dtype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _qmatmul_group(x, h, qws, bs, backend: Backend, compute_dtype, x_dtype):
  lead = x.shape[:-1]
  update = None if h is None else (h.reshape(-1, h.shape[-1]), bs)
  ys = backend.group_fusion[1](x.reshape(-1, x.shape[-1]), qws, update)
  return tuple(y.astype(compute_dtype).reshape(*lead, y.shape[-1]) for y in ys)


def _qmatmul_group_fwd(x, h, qws, bs, backend, compute_dtype, x_dtype):
  return _qmatmul_group(x, h, qws, bs, backend, compute_dtype, x_dtype), (h, qws, bs)


def _qmatmul_group_bwd(backend, compute_dtype, x_dtype, res, dys):
  h, qws, bs = res
  dx = sum(_apply(backend.backward, dy, qw, compute_dtype).astype(x_dtype) for dy, qw in zip(dys, qws))
  if h is None:
    return dx, None, None, None
  h_HxGR, r = h.reshape(-1, h.shape[-1]), bs[0].shape[0]
  grads = [_update_grads(h_HxGR[:, i * r:(i + 1) * r], b, dy, compute_dtype)
           for i, (b, dy) in enumerate(zip(bs, dys))]
  dh = jnp.concatenate([g[0] for g in grads], axis=1).reshape(h.shape)
  return dx, dh, None, tuple(g[1] for g in grads)


_qmatmul_group.defvjp(_qmatmul_group_fwd, _qmatmul_group_bwd)
