"""The QLoRA linear layer: forward, gradients vs float64, frozen base, swap helper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as q
from pallas_kernels.backends import get_backend
from qlora_jax.nn.qmatmul import qmatmul

N, K, R = 96, 128, 8


def _layer(compute_dtype="float32", bias=True, dropout=0.0, seed=0, **kw):
  w = jax.random.normal(jax.random.key(seed), (N, K), jnp.float32) * 0.05
  b = jax.random.normal(jax.random.key(seed + 1), (N,), jnp.float32) if bias else None
  cfg = q.LoraConfig(rank=R, alpha=16.0, dropout=dropout, **kw)
  layer = q.QLoRALinear.from_quantized(q.quantize(w), cfg, bias=b, compute_dtype=compute_dtype,
                                       rngs=nnx.Rngs(seed + 2))
  # Nonzero B so gradients of A are nonzero too (PEFT initialises B to zeros).
  layer.lora_b[...] = jax.random.normal(jax.random.key(seed + 3), (R, N)) * 0.1
  return layer


def _reference_f64(layer, x):
  """float64 numpy forward and gradients of sum(y * g), built on the dequantized weight."""
  w = np.asarray(q.dequantize(layer.weight.get_value(), jnp.float32), np.float64)
  a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
  bias = np.asarray(layer.bias[...], np.float64)
  x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  s = layer.lora.scaling
  y = x64 @ w.T + s * (x64 @ a) @ b + bias
  g = np.asarray(jax.random.normal(jax.random.key(9), y.shape), np.float64)
  dx = g @ w + s * (g @ b.T) @ a.T
  da = s * x64.T @ (g @ b.T)
  db = s * (x64 @ a).T @ g
  lead = x.shape[:-1]
  return y.reshape(*lead, -1), g.reshape(*lead, -1), dx.reshape(x.shape), da, db


@pytest.mark.parametrize("compute_dtype, rtol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_forward_and_gradients_match_float64(compute_dtype, rtol):
  layer = _layer(compute_dtype)
  x = jax.random.normal(jax.random.key(5), (3, 7, K), jnp.float32)
  y_ref, g, dx_ref, da_ref, db_ref = _reference_f64(layer, x)

  def loss(lay, x):
    return jnp.sum(lay(x) * jnp.asarray(g, jnp.float32))

  y = layer(x)
  grads, dx = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1))(layer, x)

  def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)

  errors = {"y": rel(y, y_ref), "dx": rel(dx, dx_ref),
            "dA": rel(grads["lora_a"][...], da_ref), "dB": rel(grads["lora_b"][...], db_ref)}
  print(f"\n{compute_dtype} relative errors vs float64:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert all(e < rtol for e in errors.values()), errors
  # The gradient state holds the two LoRA matrices and nothing of the frozen base.
  assert sorted(k for k, _ in nnx.to_flat_state(grads)) == [("lora_a",), ("lora_b",)]


def test_qmatmul_gives_no_cotangent_to_the_weight_and_saves_no_dense_weight():
  qw = q.quantize(jax.random.normal(jax.random.key(0), (N, K)))
  x = jax.random.normal(jax.random.key(1), (16, K))
  y, vjp = jax.vjp(lambda x, qw: qmatmul(x, qw, get_backend("xla"), jnp.bfloat16), x, qw)
  dx, dqw = vjp(jnp.ones_like(y))
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert all(not np.any(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(dqw)
             if jnp.issubdtype(leaf.dtype, jnp.floating))
  saved = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape")]
  assert not any(leaf.size >= N * K and jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in saved), \
      [(leaf.shape, leaf.dtype) for leaf in saved]


def test_fresh_layer_equals_the_base_layer():
  w = jax.random.normal(jax.random.key(0), (N, K)) * 0.05
  layer = q.QLoRALinear.from_quantized(q.quantize(w), q.LoraConfig(rank=R),
                                       compute_dtype="float32", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, K))
  base = x @ q.dequantize(layer.weight.get_value(), jnp.float32).T
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(base), rtol=1e-5, atol=1e-6)
  bound = 1 / np.sqrt(K)  # PEFT's kaiming_uniform(a=sqrt(5)) bound for A
  a = np.asarray(layer.lora_a[...])
  assert a.shape == (K, R) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
  assert not np.any(np.asarray(layer.lora_b[...]))


def test_scaling_and_rslora():
  assert q.LoraConfig(rank=64, alpha=16).scaling == 0.25
  assert q.LoraConfig(rank=64, alpha=16, use_rslora=True).scaling == 2.0


def test_dropout_only_in_training_mode():
  layer = _layer("float32", dropout=0.5)
  x = jax.random.normal(jax.random.key(1), (8, K))
  y1, y2 = layer(x), layer(x)
  assert not np.allclose(np.asarray(y1), np.asarray(y2))  # fresh masks each call
  layer.eval()
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer(x)))


def test_optimizer_step_moves_lora_and_leaves_base_bytes_unchanged():
  layer = _layer("bfloat16")
  before = jax.tree.map(np.array, layer.weight.get_value())
  bias_before = np.array(layer.bias[...])
  a_before = np.array(layer.lora_a[...])
  opt = nnx.Optimizer(layer, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  x = jax.random.normal(jax.random.key(1), (8, K), jnp.bfloat16)

  @nnx.jit
  def step(layer, opt, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x).astype(jnp.float32) ** 2),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    opt.update(layer, grads)

  step(layer, opt, x)
  after = layer.weight.get_value()
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.asarray(new).tobytes() == np.asarray(old).tobytes()
  assert np.asarray(layer.bias[...]).tobytes() == bias_before.tobytes()
  assert not np.array_equal(np.asarray(layer.lora_a[...]), a_before)
  # Optimizer state covers the LoRA parameters only: two Adam moments of A and B.
  moments = [leaf for leaf in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if leaf.ndim == 2]
  assert sum(m.size for m in moments) == 2 * (K * R + R * N)


class _Toy(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(50, K, rngs=rngs)
    self.blocks = nnx.List([_Block(rngs) for _ in range(2)])
    self.lm_head = nnx.Linear(K, 50, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    for blk in self.blocks:
      h = blk(h)
    return self.lm_head(h)


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.Linear(K, K, rngs=rngs)
    self.up_proj = nnx.Linear(K, 2 * K, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(2 * K, K, use_bias=False, rngs=rngs)

  def __call__(self, h):
    return h + self.down_proj(jax.nn.silu(self.up_proj(self.q_proj(h))))


def test_apply_qlora_swaps_all_linear_but_lm_head():
  model = _Toy(nnx.Rngs(0))
  ids = jnp.arange(12).reshape(2, 6)
  ref = model(ids)
  replaced = q.apply_qlora(model, q.LoraConfig(rank=4), compute_dtype="float32", rngs=nnx.Rngs(1))
  assert sorted(replaced) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                   for n in ("q_proj", "up_proj", "down_proj"))
  assert isinstance(model.lm_head, nnx.Linear)
  assert all(isinstance(getattr(b, n), q.QLoRALinear) for b in model.blocks
             for n in ("q_proj", "up_proj", "down_proj"))
  # Same function up to 4-bit rounding (B = 0 at init).
  out = model(ids)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.15
  assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 12


def test_apply_qlora_targets_and_errors():
  model = _Toy(nnx.Rngs(0))
  assert q.apply_qlora(model, q.LoraConfig(rank=4), targets=("q_proj",), rngs=nnx.Rngs(1)) == \
      ["blocks.0.q_proj", "blocks.1.q_proj"]
  with pytest.raises(ValueError, match="no Linear layer matches"):
    q.apply_qlora(_Toy(nnx.Rngs(0)), q.LoraConfig(rank=4), targets=("o_proj",), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("kw, match", [
    (dict(rank=0), "rank"), (dict(dropout=1.5), "dropout"), (dict(param_dtype="int8"), "param_dtype"),
])
def test_bad_lora_config(kw, match):
  with pytest.raises(ValueError, match=match):
    q.LoraConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(backend="cuda-magic"), "backend"), (dict(compute_dtype="int8"), "compute_dtype"),
])
def test_bad_layer_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    q.QLoRALinear(64, 32, lora=q.LoraConfig(rank=2), rngs=nnx.Rngs(0), **kw)


def test_layer_rejects_non_matrix_weight():
  with pytest.raises(ValueError, match="2-D"):
    q.QLoRALinear.from_quantized(q.quantize(jnp.ones((4, 8, 64))), q.LoraConfig(rank=2),
                                 rngs=nnx.Rngs(0))


def test_layer_without_adapter_is_frozen_base():
  w = jax.random.normal(jax.random.key(0), (N, K))
  layer = q.QLoRALinear.from_quantized(q.quantize(w), None, compute_dtype="float32", rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(layer, nnx.LoRAParam))
  x = jax.random.normal(jax.random.key(1), (4, K))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(
      x @ q.dequantize(layer.weight.get_value(), jnp.float32).T), rtol=1e-5, atol=1e-6)


def test_zeros_quantized_is_zero_and_shaped_like_quantize():
  for quant in (q.QuantConfig(), q.QuantConfig(quant_type="fp4", double_quant=False),
                q.QuantConfig(quant_type="int4", blocksize=128)):
    z = q.zeros_quantized((300, 70), quant, "float32")
    ref = q.quantize(jnp.ones((300, 70)), quant.quant_type, quant.blocksize, quant.double_quant)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), z) == jax.tree.map(lambda a: (a.shape, a.dtype), ref)
    assert not np.any(np.asarray(q.dequantize(z, jnp.float32)))


def test_backend_switch_routes_forward_and_backward():
  """A layer's backend serves both products of the layer (the Pallas kernels plug in here)."""
  from pallas_kernels.backends import Backend

  calls = []
  xla = get_backend("xla")
  recording = Backend("recording", forward=lambda x, w, cd: calls.append("fwd") or xla.forward(x, w, cd),
                      backward=lambda dy, w, cd: calls.append("bwd") or xla.backward(dy, w, cd))
  w = jax.random.normal(jax.random.key(0), (N, K))
  layer = q.QLoRALinear.from_quantized(q.quantize(w), q.LoraConfig(rank=R), backend=recording,
                                       compute_dtype="float32", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, K))
  dx = jax.grad(lambda x: jnp.sum(layer(x)))(x)
  assert calls == ["fwd", "bwd"]
  ref = jnp.sum(q.dequantize(layer.weight.get_value(), jnp.float32), axis=0)  # d sum(xW^T)/dx
  np.testing.assert_allclose(np.asarray(dx), np.broadcast_to(ref, dx.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("subscripts, a_shape, b_shape", [
    ("...k,kr->...r", (1, 1, 96), (96, 16)), ("...r,rn->...n", (1, 1, 16), (16, 40)),
    ("mk,nk->mn", (1, 96), (40, 96)), ("mn,nk->mk", (1, 40), (40, 96))])
def test_one_row_dot_matches_float64(subscripts, a_shape, b_shape):
  """The one-row product (batch-1 decoding on a GPU: the row broadcast, the first kept) is the
  einsum of its bf16 operands to bf16 rounding, with x's leading shape kept."""
  from pallas_kernels.xla import one_row_dot
  a = jax.random.normal(jax.random.key(0), a_shape, jnp.float32)
  b = jax.random.normal(jax.random.key(1), b_shape, jnp.float32)
  out = one_row_dot(subscripts, a, b, jnp.bfloat16)
  a64, b64 = (np.asarray(v.astype(jnp.bfloat16), np.float64) for v in (a, b))
  want = np.einsum(subscripts, a64, b64)
  assert out.shape == want.shape and out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-2,
                             atol=1e-2 * np.abs(want).max())
