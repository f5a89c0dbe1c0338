"""Generation variants timed in one process on one model (random NF4 + DQ llama3-8b, LoRA r=64,
unrolled): ms a token of generate's chunk loop (generate.run_chunks), (t(9 chunks) - t(1 chunk))
/ 128, alternated --rounds times. A variant is a function that patches the library (and returns
the undo), applied around everything run for it: its compile (the decoder's compile cache is
cleared first), its timing and its profile.

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python bench/device/variants.py base read_back_first
"""
import argparse
import collections
import contextlib
import dataclasses
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from common import SHAPES, generation_model  # noqa: E402
from pallas_kernels import gpu_decode  # noqa: E402
from qlora_jax.nn import generate, model as model_module  # noqa: E402
from qlora_jax.nn.generate import CHUNK, greedy_chunk  # noqa: E402


def base():
  return lambda: None


def cudnn_attention():
  """One-query attention over the cache through cuDNN's kernel (the mask as its bias)."""
  original = model_module.attend

  def attend(q, k, v, mask, *, implementation, **kw):
    return original(q, k, v, mask, implementation="cudnn" if q.shape[1] == 1 else implementation, **kw)
  model_module.attend = attend
  return lambda: setattr(model_module, "attend", original)


def reduce_attention():
  """One-query attention over the cache as float32 multiply-reductions (scores, max, sum and the
  weighted values: reductions XLA fuses with their elementwise work, no dot, no transpose)."""
  original = model_module.attend

  def attend(q, k, v, mask, *, implementation, scale, window=None, softcap=None, name_residuals=False):
    if q.shape[1] != 1 or softcap is not None or window is not None:
      return original(q, k, v, mask, implementation=implementation, scale=scale, window=window,
                      softcap=softcap, name_residuals=name_residuals)
    b, _, n, h = q.shape
    kvh = k.shape[2]
    qf = q.reshape(b, 1, kvh, n // kvh, h).astype(jnp.float32) * scale
    scores = jnp.sum(qf * k.astype(jnp.float32)[:, :, :, None, :], axis=-1)  # [B, S, KV, G]
    scores = jnp.where(mask[:, 0, :, None, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=1, keepdims=True)
    weights = jnp.exp(scores - top)
    out = jnp.sum(weights[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B, KV, G, H]
    out = out / jnp.sum(weights, axis=1)[..., None]
    return out.reshape(b, 1, n, h).astype(q.dtype)
  model_module.attend = attend
  return lambda: setattr(model_module, "attend", original)


def grouped_attention():
  """One-query attention over the cache as two einsums with the query group as its own axis
  (scores [B, KV, G, T, S], then [B, T, KV, G, H] = the natural [B, T, N, H]), where
  jax.nn.dot_product_attention vmaps over the group: its value product comes out [KV, H, G] and a
  transpose kernel a layer puts it back for o_proj's A product."""
  original = model_module.attend

  def attend(q, k, v, mask, *, implementation, scale, window=None, softcap=None, name_residuals=False):
    if q.shape[1] != 1 or softcap is not None or window is not None or mask is None:
      return original(q, k, v, mask, implementation=implementation, scale=scale, window=window,
                      softcap=softcap, name_residuals=name_residuals)
    b, t, n, h = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, n // kvh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
  model_module.attend = attend
  return lambda: setattr(model_module, "attend", original)


def xla_attention():
  """One-query attention as XLA's kernels (five a layer: the score GEMM, the softmax, the value
  GEMM, two transposes), as on main: attend's "decode" finds no kernel (dispatch.decode_attention
  answers None) and falls back to "xla"."""
  from pallas_kernels import dispatch
  original = dispatch.decode_attention
  dispatch.decode_attention = lambda *a, **kw: None
  return lambda: setattr(dispatch, "decode_attention", original)


def stacked_cache():
  """The KV cache as one [L, B, S, KV, H] array for the unrolled layers too (before 2026-12-07)."""
  original = model_module.CausalLM.empty_cache

  def empty_cache(self, batch, length):
    return model_module.KVCache.empty(self.config, batch, length, jnp.dtype(self.options.dtype))
  model_module.CausalLM.empty_cache = empty_cache
  return lambda: setattr(model_module.CausalLM, "empty_cache", original)


def tables_first():
  """Every warpgroup of a decode CTA waits for its tables (the pair table, qmap, h) before the
  pipeline starts (before 2026-12-07's fourteenth session: now only the compute warpgroups do, so
  the memory warpgroup's first code copies fly with the tables')."""
  original = gpu_decode.config_for
  gpu_decode.config_for = lambda *a, **kw: dataclasses.replace(original(*a, **kw),
                                                              tables_under_pipeline=False)
  return lambda: setattr(gpu_decode, "config_for", original)


def pdl():
  """The decode kernel launched as a programmatic dependent launch (Config.pdl): its launch, CTA
  setup and the constant tables' copies under the previous kernel's tail, and the next kernel's
  launch under its own."""
  original = gpu_decode.config_for
  gpu_decode.config_for = lambda *a, **kw: dataclasses.replace(original(*a, **kw), pdl=True)
  return lambda: setattr(gpu_decode, "config_for", original)


def norm_before():
  """Each pre-norm applied to its products' input (its own reduction and multiply between the
  residual add and the decode launch), as before 2026-12-07's sixteenth session."""
  original = model_module.shared_input

  def shared_input(layers, x, norm=None):
    return original(layers, x if norm is None else norm(x))
  model_module.shared_input = shared_input
  return lambda: setattr(model_module, "shared_input", original)


def norm_in_launch():
  """The pre-norm's 1 / rms reduced inside the decode launch (decode_group's norm_input: each
  compute warpgroup sums x^2 from x's copy in shared memory and scales its stores), not by an XLA
  reduction kernel between the residual add and the products' consumers; the products still take
  x * weight (two kernels a layer fewer, counted). Generation only (the group's forward, not
  qmatmul_group's differentiable wrapper); the library form: branch decode-launch-cuts."""
  from pallas_kernels import dispatch
  from qlora_jax.nn import lora as lora_module
  original = model_module.shared_input

  def shared_input(layers, x_BxK, norm=None):
    first = layers[0]
    x_MxK = x_BxK.reshape(-1, x_BxK.shape[-1])
    if (norm is None or first.lora is None or x_MxK.shape[0] != 1 or x_BxK.dtype != jnp.bfloat16
        or any(layer._dropout_active() for layer in layers)
        or not lora_module.one_launch_applies(layers, x_BxK)):
      return original(layers, x_BxK, norm)
    cd = jnp.dtype(first.compute_dtype)
    xin = norm.split(x_MxK)[0]  # x * weight (its 1 / rms: the kernel's)
    h = lora_module._update_input(xin, jnp.concatenate([layer.lora_a[...] for layer in layers], axis=1),
                                  first.update_scale, cd)
    qws = tuple(layer.weight.get_value() for layer in layers)
    ys = gpu_decode.decode_group(xin.astype(jnp.bfloat16), qws, (h, tuple(layer.lora_b[...] for layer in layers)),
                                 x_MxK, eps=norm.eps, interpret=dispatch.INTERPRET)
    return tuple(layer._finish(y.reshape(*x_BxK.shape[:-1], -1).astype(cd), x_BxK)
                 for layer, y in zip(layers, ys))
  model_module.shared_input = shared_input
  return lambda: setattr(model_module, "shared_input", original)


def read_back_first():
  """Generate's chunk loop before 2026-12-07: each chunk's tokens read back before the next chunk
  is dispatched (run_chunks dispatches it first)."""
  original = generate.run_chunks

  def run_chunks(chunk, state, token, cache, key, n):
    for _ in range(n):
      key, sub = jax.random.split(key)
      tokens, cache = chunk(state, token, cache, sub)
      token = tokens[:, -1]
      yield np.asarray(tokens)
  generate.run_chunks = run_chunks
  return lambda: setattr(generate, "run_chunks", original)


VARIANTS = {f.__name__: f for f in (base, cudnn_attention, reduce_attention, grouped_attention,
                                    xla_attention,
                                    stacked_cache, tables_first, pdl, norm_before,
                                    norm_in_launch,
                                    read_back_first)}


@contextlib.contextmanager
def applied(name):
  """A variant, or several joined by '+', applied for the block."""
  undos = [VARIANTS[part]() for part in name.split("+")]
  try:
    yield
  finally:
    for undo in reversed(undos):
      undo()


def tokens_of(run, n: int) -> list:
  """n chunks of generate's loop (generate.run_chunks, looked up now: a variant may replace it)
  from a copy of the empty cache (each chunk donates its cache)."""
  chunk, state, token, empty, key = run
  return list(generate.run_chunks(chunk, state, token, jax.tree.map(jnp.copy, empty), key, n))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("variants", nargs="+", help=f"of {sorted(VARIANTS)}, or several joined by '+'")
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--layers", type=int, help="default: the model's")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--slots", type=int, default=64 + 9 * CHUNK,
                 help="the cache's length (attention reads every slot: a long context's cost)")
  p.add_argument("--profile", action="store_true", help="then each variant's kernels a token (CUPTI)")
  a = p.parse_args()
  model = generation_model({**SHAPES[a.model], **({"num_hidden_layers": a.layers} if a.layers else {})})
  runs = {}
  for name in a.variants:
    generate._decoder.cache_clear()
    try:
      with applied(name):
        chunk, (state, token, empty, key) = greedy_chunk(model, 1, a.slots)
        t0 = time.perf_counter()
        first = tokens_of((chunk, state, token, empty, key), 1)[0]
    except Exception as e:  # a variant the platform refuses: said, the others still run
      print(f"{name}: failed: {str(e).splitlines()[0][:300]}", flush=True)
      continue
    print(f"{name}: compiled and ran in {time.perf_counter() - t0:.1f} s, tokens {first[0, :8].tolist()}",
          flush=True)
    runs[name] = (chunk, state, token, empty, key)

  def per_token(name):
    with applied(name):
      t0 = time.perf_counter()
      tokens_of(runs[name], 1)
      t1 = time.perf_counter()
      tokens_of(runs[name], 9)
      return 1e3 * ((time.perf_counter() - t1) - (t1 - t0)) / (8 * CHUNK)

  rows = {name: [] for name in runs}
  for _ in range(a.rounds):
    for name in runs:
      rows[name].append(per_token(name))
  for name, v in rows.items():
    print(f"{name:18} ms/token median {statistics.median(v):.3f}  all " + " ".join(f"{x:.3f}" for x in v))
  if a.profile:
    for name in runs:  # the profile compiles the chunk again, inside the profiler's own jit
      with applied(name):
        profile(name, *runs[name])

def profile(name, chunk, state, token, empty, key):
  """Kernels a token of one chunk, by name with XLA's numbering dropped."""
  from jax.experimental.mosaic.gpu import profiler
  # traced inside measure's own jit (the chunk's donation does not apply there), the state an argument
  _, kernels = profiler.measure(lambda s, c: chunk(s, token, c, key), aggregate=False)(
      state, jax.tree.map(jnp.copy, empty))
  groups = collections.defaultdict(lambda: [0, 0.0])
  for kernel, ms in kernels:
    g = groups[re.sub(r"[._]\d+$", "", kernel)]
    g[0] += 1
    g[1] += ms
  total = sum(ms for _, ms in kernels)
  print(f"{name}: {len(kernels) / CHUNK:.1f} kernels, {total / CHUNK:.3f} ms a token: " + ", ".join(
      f"{k} {n / CHUNK:.0f}x {ms / CHUNK:.3f}" for k, (n, ms) in sorted(groups.items(), key=lambda x: -x[1][1])))


if __name__ == "__main__":
  main()
