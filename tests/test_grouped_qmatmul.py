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
