"""The optimizer update: streamed in chunks of layers from host memory == optax's whole update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.train.optimizer import (HostState, apply_update, global_norm, init_optimizer, make_optimizer,
                                 make_streamed_update, offload, offload_sharding, stacked_layers)
from qlora_jax.train.config import OptimConfig

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
  pinned host memory: streamed in chunks of layers (stacked: 3 layers in chunks of 2 and 1) or
  brought in whole (unstacked), the LoRA and the moments equal optax's chain on float32 copies;
  moments stay float32 on the host, the LoRA keeps its dtype."""
  tx, _ = make_optimizer(OptimConfig(weight_decay=0.1, warmup_ratio=0.0, learning_rate=1e-2))
  lora = _lora(jnp.dtype(dtype), stacked)
  assert stacked_layers(lora) == (LAYERS if stacked else 0)
  state = init_optimizer(tx, lora)
  host = offload_sharding(state)
  state = offload(state, host, lora, chunk_layers=2)
  assert isinstance(state, HostState) == stacked
  if stacked:
    assert state.bounds == ((0, 2), (2, 3))
    streamed = make_streamed_update(tx)
    step = lambda g, s, p: streamed(p, g, global_norm(g), s)[::-1]  # noqa: E731
  else:
    step = jax.jit(lambda g, s, p: apply_update(tx, g, s, p, host)[::-1], out_shardings=(host, None))
  ref_lora, ref_state = jax.device_get(lora), jax.device_get(optax_state(state))
  for i, scale in enumerate([10.0, 1e-3]):  # norms ~100 (clipped at 0.3), then ~0.01
    grads = _grads(lora, scale, seed=i)
    want, ref_state, _ = _reference(tx, grads, ref_state, ref_lora)
    state, lora = step(grads, state, lora)
    ref_lora = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), want)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == "float32" else dict(rtol=2**-7, atol=1e-6)
    for got, exp in zip(jax.tree.leaves(lora), jax.tree.leaves(ref_lora)):
      assert got.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exp, np.float32), **tol)
    assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(state))
    for got, exp in zip(jax.tree.leaves(optax_state(state)), jax.tree.leaves(ref_state)):
      assert got.dtype == exp.dtype
      np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-6 * np.abs(exp).max())
  assert int(jax.tree.leaves(optax_state(state))[0]) == 2  # AdamW's step count


def optax_state(state):
  return state.stacked() if isinstance(state, HostState) else state


def test_streamed_update_keeps_a_few_chunks_of_moments_on_the_device(monkeypatch):
  """The streamed update bounds what it puts on the device: whenever it waits for a write-back,
  at most 5 chunks' moments are live in device memory (the one being written back, the one
  updated, two fetched ahead, one just fetched), however many chunks there are (16 here). The
  device's peak at 65B, the measure that counts, is in docs/BENCHMARKS.md (39.86 GiB)."""
  tx, _ = make_optimizer(OptimConfig())
  lora = _lora(jnp.float32, layers=16)
  grads = _grads(lora, 1.0, 0)
  state = offload(init_optimizer(tx, lora), offload_sharding(init_optimizer(tx, lora)), lora, chunk_layers=1)
  per_chunk = len(state.chunks[0])
  counts, wait = [], jax.block_until_ready

  def counting_wait(x):
    counts.append(sum(1 for a in jax.live_arrays() if a.sharding.memory_kind == "device"
                      and a.ndim == 3 and a.shape[0] == 1 and a.dtype == jnp.float32))
    return wait(x)

  monkeypatch.setattr(jax, "block_until_ready", counting_wait)
  streamed = make_streamed_update(tx)
  lora, state = streamed(lora, grads, global_norm(grads), state)
  assert len(counts) == 16 - 4  # one wait per chunk fetched after the first four
  assert max(counts) <= 5 * per_chunk, (counts, per_chunk)
  assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(state))
