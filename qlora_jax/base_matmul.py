"""The frozen 4-bit base matmul y = x @ dequant(W)^T behind one custom VJP, with backends.

The backward returns dX = dY @ dequant(W) and no cotangent for the frozen weight, and saves
nothing but the quantized weight itself: no full-precision copy of W lives between forward and
backward. A backend is a pair of functions (forward, backward) on the quantized weight; "xla" is
the pure-XLA reference (dequantize, then a bf16 dot with float32 accumulation). Pallas kernels
register themselves under their own names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from qlora_jax.quantization import QuantizedArray, dequantize

# forward(x [M, K], qw [N, K], compute_dtype) -> y [M, N] (float32 or compute_dtype)
# backward(dy [M, N], qw [N, K], compute_dtype) -> dx [M, K] (float32 or compute_dtype)
MatmulFn = Callable[[jax.Array, QuantizedArray, jnp.dtype], jax.Array]


@dataclasses.dataclass(frozen=True)
class Backend:
  """A pair of implementations of the two products the layer needs."""

  forward: MatmulFn
  backward: MatmulFn


def frozen_weight(qw: QuantizedArray | jax.Array, compute_dtype) -> jax.Array:
  """The base weight [out, in] in the compute dtype: dequantized, or a dense (bf16) base as is.

  A dense array is the unquantized baseline (a bf16 base with the same layers, LoRA and step:
  scripts/quality.py's parity run); the Pallas backends hand it to this path too.
  """
  if isinstance(qw, QuantizedArray):
    return dequantize(qw, compute_dtype)
  return qw.astype(compute_dtype)


def precision_for(dtype) -> lax.Precision | None:
  """Float32 operands multiply in full float32 (HIGHEST); 16-bit ones need no flag.

  JAX's default lets a GPU take TF32 (10-bit mantissas) and a TPU bf16 passes for float32
  matmuls; a model run in float32 asks for float32, as torch computes it by default."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def compute_dot(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
  """einsum of a and b as compute_dtype operands, float32 accumulation, result in compute_dtype.

  A GPU's or TPU's bf16 matmul accumulates in float32 and rounds once as it writes, so the result
  is asked for in compute_dtype: a float32 result would be one more pass over [M, N] to convert
  (at 65B, 5 of every 21 ms of a layer went to such passes). XLA:CPU's fast bf16 matmul (AMX) is
  the float32-result one, so there the result is rounded after: the same numbers either way.
  """
  cd = jnp.dtype(compute_dtype)
  if jax.default_backend() == "gpu" and math.prod(a.shape[:-1]) == 1:
    return one_row_dot(subscripts, a, b, cd)
  return _einsum(subscripts, a, b, cd)


def _einsum(subscripts: str, a: jax.Array, b: jax.Array, cd: jnp.dtype) -> jax.Array:
  result = jnp.float32 if jax.default_backend() == "cpu" else cd
  return jnp.einsum(subscripts, a.astype(cd), b.astype(cd), preferred_element_type=result,
                    precision=precision_for(cd)).astype(cd)


def one_row_dot(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype, rows: int = 8):
  """compute_dot for an `a` of one row (batch-1 decoding: the LoRA products, 'xla' forward):
  the row broadcast to `rows` rows, the first row of the product kept.

  XLA's GPU simplifier rewrites a small vector x matrix dot into multiply + reduce: each product
  rounded to bf16, then a column reduction (over K = 4096 into 64 columns for a LoRA A) with
  little parallelism. On the H100 a LoRA pair x @ A @ B at one row took 9.4-9.9 µs that way and
  5.1-5.7 µs as an 8-row tensor-core product (docs/BENCHMARKS.md, "Generation"), which also keeps
  the products exact (float32 accumulation). A broadcast, not zero rows: XLA fuses it into the
  product, where a pad is a kernel of its own."""
  out = _einsum(subscripts, jnp.broadcast_to(a.reshape(1, a.shape[-1]), (rows, a.shape[-1])), b,
                jnp.dtype(compute_dtype))
  return out[:1].reshape(*a.shape[:-1], *out.shape[1:])


def _xla_forward(x_MxK: jax.Array, qw: QuantizedArray, compute_dtype) -> jax.Array:
  return compute_dot("mk,nk->mn", x_MxK, frozen_weight(qw, compute_dtype), compute_dtype)


def _xla_backward(dy_MxN: jax.Array, qw: QuantizedArray, compute_dtype) -> jax.Array:
  return compute_dot("mn,nk->mk", dy_MxN, frozen_weight(qw, compute_dtype), compute_dtype)


_BACKENDS: dict[str, Backend] = {"xla": Backend(_xla_forward, _xla_backward)}


def register_backend(name: str, backend: Backend) -> None:
  """Make a backend selectable by name (the Pallas kernels call this)."""
  _BACKENDS[name] = backend


def available_backends() -> tuple[str, ...]:
  return tuple(dict.fromkeys((*_BACKENDS, *_PALLAS_BACKENDS)))


_PALLAS_BACKENDS = ("auto", "pallas")  # registered by pallas_kernels.dispatch on first use


def get_backend(name: str) -> Backend:
  if name in _PALLAS_BACKENDS and name not in _BACKENDS:
    import pallas_kernels.dispatch  # noqa: F401  (registers them; imports this module)
  if name not in _BACKENDS:
    raise ValueError(f"unknown qmatmul backend {name!r}; available: {available_backends()}")
  return _BACKENDS[name]


def qmatmul(x: jax.Array, qw: QuantizedArray, backend: str = "xla",
            compute_dtype=jnp.bfloat16) -> jax.Array:
  """y [..., N] in compute_dtype = x [..., K] @ dequant(qw)^T: compute_dtype operands, float32
  accumulation, one rounding.

  Differentiable in x only: the gradient is dx = dy @ dequant(qw), in x's dtype.
  """
  get_backend(backend)  # fail early, by name, on an unknown backend
  return _qmatmul(x, qw, backend, jnp.dtype(compute_dtype), jnp.dtype(x.dtype))


def _apply(fn: MatmulFn, x: jax.Array, qw: QuantizedArray, compute_dtype) -> jax.Array:
  """Run a 2-D backend function over any leading dims of x; the result in compute_dtype."""
  lead = x.shape[:-1]
  y = fn(x.reshape(-1, x.shape[-1]), qw, compute_dtype).astype(compute_dtype)
  return y.reshape(*lead, y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmatmul(x, qw, backend, compute_dtype, x_dtype):
  return _apply(get_backend(backend).forward, x, qw, compute_dtype)


def _qmatmul_fwd(x, qw, backend, compute_dtype, x_dtype):
  # The only residual is the quantized weight, which is resident anyway; x is not saved.
  return _qmatmul(x, qw, backend, compute_dtype, x_dtype), qw


def _qmatmul_bwd(backend, compute_dtype, x_dtype, qw, dy):
  dx = _apply(get_backend(backend).backward, dy, qw, compute_dtype)
  return dx.astype(x_dtype), None  # None: no cotangent for the frozen weight


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)
