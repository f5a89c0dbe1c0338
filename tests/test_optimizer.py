"""The optimizer update: streamed layer by layer from host memory == optax's whole update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.optimizer import (_stacked_layers, apply_update, init_optimizer, make_optimizer,
                                 offload_sharding)
from qlora_jax.train_config import TrainConfig

LAYERS = 3


def _lora(dtype, stacked=True, seed=0, layers=LAYERS):
  """A LoRA-shaped tree: per layer A [in, r] and B [r, out] of two projections."""
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  shapes = {"q": ((48, 4), (4, 40)), "down": ((72, 4), (4, 48))}
  lead = (layers,) if stacked else ()
  return {name: {"a": 0.1 * jax.random.normal(next(keys), lead + a).astype(dtype),
                 "b": 0.1 * jax.random.normal(next(keys), lead + b).astype(dtype)}
          for name, (a, b) in shapes.items()}


def _grads(lora, scale, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  return jax.tree.map(lambda x: (scale * jax.random.normal(next(keys), x.shape)).astype(x.dtype), lora)


def _reference(tx, grads, opt_state, lora):
  """optax's chain on float32 copies, the result rounded to the LoRA dtype."""
  f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
  updates, state = tx.update(f32(grads), jax.device_get(opt_state), f32(lora))
  return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), f32(lora), updates), state, lora


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stacked", [True, False])
def test_offloaded_update_equals_optax(dtype, stacked):
  """Two AdamW steps (weight decay on; the first clipped, the second not) with the state in
  pinned host memory: streamed over the layer axis (stacked) or brought in whole (unstacked),
  the LoRA and the moments equal optax's chain on float32 copies; moments stay float32 on the
  host, the LoRA keeps its dtype."""
  cfg = TrainConfig(model_dir="-", dataset="-", weight_decay=0.1, warmup_ratio=0.0, learning_rate=1e-2)
  tx, _ = make_optimizer(cfg)
  lora = _lora(jnp.dtype(dtype), stacked)
  assert _stacked_layers(lora) == (LAYERS if stacked else 0)
  state = init_optimizer(tx, lora)
  host = offload_sharding(state)
  state = jax.device_put(state, host)
  step = jax.jit(lambda g, s, p: apply_update(tx, g, s, p, host), out_shardings=(None, host))
  ref_lora, ref_state = jax.device_get(lora), jax.device_get(state)
  for i, scale in enumerate([10.0, 1e-3]):  # norms ~100 (clipped at 0.3), then ~0.01
    grads = _grads(lora, scale, seed=i)
    want, ref_state, _ = _reference(tx, grads, ref_state, ref_lora)
    lora, state = step(grads, state, lora)
    ref_lora = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), want)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == "float32" else dict(rtol=2**-7, atol=1e-6)
    for got, exp in zip(jax.tree.leaves(lora), jax.tree.leaves(ref_lora)):
      assert got.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exp, np.float32), **tol)
    for got, exp in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
      assert got.sharding.memory_kind == "pinned_host" and got.dtype == exp.dtype
      np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-6 * np.abs(exp).max())
  assert int(jax.tree.leaves(state)[0]) == 2  # AdamW's step count


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="device memory is distinct from host memory on a GPU only")
def test_streamed_update_holds_one_layer_of_moments_on_the_device():
  """XLA's buffer assignment on a GPU: the whole update needs device scratch for every moment, the
  streamed one for two layers' worth (the one updated and the one fetched ahead; 8 layers here)."""
  tx, _ = make_optimizer(TrainConfig(model_dir="-", dataset="-"))
  lora = jax.tree.map(lambda x: jnp.tile(x, (1, 16, 16)), _lora(jnp.float32, layers=8))
  state = init_optimizer(tx, lora)
  host = offload_sharding(state)
  grads = _grads(lora, 1.0, 0)
  moments = 2 * sum(x.nbytes for x in jax.tree.leaves(lora))
  on_device = jax.tree.map(lambda h: h.with_memory_kind("device"), host)

  def scratch(fn):
    compiled = jax.jit(fn, out_shardings=(None, host), donate_argnums=2).lower(grads, jax.device_put(state, host), lora).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  streamed = scratch(lambda g, s, p: apply_update(tx, g, s, p, host))
  whole = scratch(lambda g, s, p: apply_update(tx, g, jax.device_put(s, on_device), p))
  print(f"device scratch: whole {whole} B, streamed {streamed} B, moments {moments} B")
  assert whole >= moments, (whole, moments)
  assert streamed < moments // 2, (streamed, moments)
