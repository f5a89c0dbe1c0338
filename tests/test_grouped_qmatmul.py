"""The experts' grouped 4-bit matmul (qlora_jax/nn/grouped_qmatmul.py) against a float64 numpy
loop over rows, each row times its own expert's dequantized weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.format.quantization import dequantize, quantize
from qlora_jax.nn.grouped_qmatmul import grouped_qmatmul

EXPERTS, OUT, IN = 4, 96, 128
SIZES = (5, 0, 9, 3)  # an expert with no rows; 3 rows past the groups' total
ROWS = sum(SIZES) + 3


def _case(seed=0):
  rng = np.random.default_rng(seed)
  qw = quantize(jnp.asarray(rng.standard_normal((EXPERTS, OUT, IN)) * 0.05, jnp.float32), "nf4", 64, True)
  x = rng.standard_normal((ROWS, IN)).astype(np.float32)
  g = rng.standard_normal((ROWS, OUT)).astype(np.float32)
  w = np.asarray(dequantize(qw, jnp.float32), np.float64)  # the experts' 4-bit values, exactly
  expert = np.repeat(np.arange(EXPERTS), SIZES)
  y = np.zeros((ROWS, OUT))
  dx = np.zeros((ROWS, IN))
  for r, e in enumerate(expert):
    y[r] = x[r] @ w[e].T
    dx[r] = g[r] @ w[e]
  return qw, x, g, jnp.asarray(SIZES, jnp.int32), y, dx


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1.5e-2)])
def test_grouped_product_and_gradient_match_a_loop_over_rows(dtype, tol):
  qw, x, g, sizes, y_ref, dx_ref = _case()

  def loss(x_):
    return jnp.sum(grouped_qmatmul(x_, qw, sizes, dtype).astype(jnp.float32) * g)

  y = jax.jit(grouped_qmatmul, static_argnums=3)(jnp.asarray(x), qw, sizes, dtype)
  dx = jax.jit(jax.grad(loss))(jnp.asarray(x))
  assert y.dtype == dtype and dx.dtype == jnp.float32
  for got, ref in ((y, y_ref), (dx, dx_ref)):
    err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
    assert err <= tol, err
  assert not np.asarray(y[sum(SIZES):], np.float32).any(), "rows past the groups must stay zero"


def test_backward_keeps_only_the_quantized_experts():
  """Between forward and backward only the 4-bit codes/scales and the sizes are kept: no
  dense [experts, out, in] copy of the weights (nor x) is a residual."""
  qw, x, _, sizes, _, _ = _case(1)
  _, vjp = jax.vjp(lambda x_: grouped_qmatmul(x_, qw, sizes, jnp.float32), jnp.asarray(x))
  shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(vjp)}
  assert (EXPERTS, OUT, IN) not in shapes and (ROWS, IN) not in shapes, shapes


def test_shapes_are_checked():
  qw, x, _, sizes, _, _ = _case()
  with pytest.raises(ValueError, match="experts, out, in"):
    grouped_qmatmul(jnp.asarray(x), quantize(jnp.ones((OUT, IN)), "nf4", 64, True), sizes)
  with pytest.raises(ValueError, match=r"x must be \[rows, 128\]"):
    grouped_qmatmul(jnp.ones((4, 64)), qw, sizes)
  with pytest.raises(ValueError, match="one per expert"):
    grouped_qmatmul(jnp.asarray(x), qw, jnp.ones(3, jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="JAX's Hopper grouped-GEMM kernels: GPU only")
def test_gpu_kernels_match_the_reference_without_a_dense_temporary():
  """bf16 on a GPU: the base product, its input gradient and the experts' LoRA (both gradients)
  against float64 loops, and the compiled step's temporaries far below the dense rewrite's
  [rows, experts x out] (what XLA's ragged_dot lowering made)."""
  from qlora_jax.nn.grouped_qmatmul import grouped_dot

  e, n, k, rows = 16, 256, 512, 4096
  rng = np.random.default_rng(1)
  sizes = np.diff(np.r_[0, np.sort(rng.integers(0, rows - 100, e - 1)), rows - 100]).astype(np.int32)
  qw = quantize(jnp.asarray(rng.standard_normal((e, n, k)) * 0.05, jnp.float32), "nf4", 64, True)
  x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
  a = jnp.asarray(rng.standard_normal((e, k, 64)) * 0.05, jnp.bfloat16)
  g = rng.standard_normal((rows, n)).astype(np.float32)
  w = np.asarray(dequantize(qw, jnp.bfloat16).astype(jnp.float32), np.float64)
  xf, af = np.asarray(x, np.float64), np.asarray(a, np.float64)
  expert = np.repeat(np.arange(e), sizes)
  y_ref, dx_ref, h_ref = np.zeros((rows, n)), np.zeros((rows, k)), np.zeros((rows, 64))
  for r, ex in enumerate(expert):
    y_ref[r], dx_ref[r], h_ref[r] = xf[r] @ w[ex].T, g[r] @ w[ex], xf[r] @ af[ex]
  sizes = jnp.asarray(sizes)

  def loss(x_):
    return jnp.sum(grouped_qmatmul(x_, qw, sizes, jnp.bfloat16).astype(jnp.float32) * g)

  step = jax.jit(jax.value_and_grad(loss))
  _, dx = step(x)
  y = jax.jit(grouped_qmatmul, static_argnums=3)(x, qw, sizes, jnp.bfloat16)
  for got, want in ((y, y_ref), (dx, dx_ref)):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    assert not np.any(got[len(expert):])  # rows past the groups: zero
  h = jax.jit(lambda x_, a_: grouped_dot(x_, a_, sizes, jnp.bfloat16))(x, a)
  assert np.linalg.norm(np.asarray(h, np.float64) - h_ref) / np.linalg.norm(h_ref) < 1e-2
  da, dA = jax.jit(jax.grad(lambda x_, a_: jnp.sum(grouped_dot(x_, a_, sizes, jnp.bfloat16).astype(jnp.float32)),
                            argnums=(0, 1)))(x, a)
  ones = np.ones((rows, 64))
  da_ref = np.stack([ones[r] @ af[ex].T for r, ex in enumerate(expert)] + [np.zeros(k)] * (rows - len(expert)))
  dA_ref = np.stack([xf[:len(expert)][expert == ex].T @ ones[:len(expert)][expert == ex] for ex in range(e)])
  assert np.linalg.norm(np.asarray(da, np.float64) - da_ref) / np.linalg.norm(da_ref) < 1e-2
  assert np.linalg.norm(np.asarray(dA, np.float64) - dA_ref) / np.linalg.norm(dA_ref) < 1e-2
  temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp < rows * e * n * 2 / 4, temp
