"""One decoding step's attention for llama3-8b's heads (32 queries, 8 KV heads of 128, batch 1):
XLA's kernels (as the model runs them: qlora_jax.nn.attention.attend, implementation "xla")
against pallas_kernels/gpu_decode_attention.py's one launch, at several cache lengths with the
last quarter of the slots masked. CUPTI kernel time a step (all its kernels), median of 20 steps,
and the largest difference from float32 XLA.

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python bench/device/attention_ab.py
"""
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels.gpu_decode_attention import bias_of, decode_attention, parts
from qlora_jax.nn.attention import attend

N, KV, H, STEPS = 32, 8, 128, 20


def main():
  print(f"{'slots':>6} {'parts':>5} {'xla µs':>7} {'kernels':>7} {'fused µs':>8} {'fused/xla':>9} {'max |diff|':>10}")
  for slots in (256, 1024, 2048, 8192):
    keys = jax.random.split(jax.random.key(slots), 3)
    q = jax.random.normal(keys[0], (STEPS, 1, 1, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, slots, KV, H), jnp.bfloat16) for key in keys[1:])
    mask = jnp.broadcast_to(jnp.arange(slots) < slots * 3 // 4, (1, 1, slots))
    scale = H ** -0.5

    def xla(q, k, v):
      return [attend(q[i], k, v, mask, implementation="xla", scale=scale) for i in range(STEPS)]

    bias = bias_of(mask)  # made once, outside the timed steps

    def fused(q, k, v):
      return [decode_attention(q[i], k, v, bias, scale=scale) for i in range(STEPS)]

    times, outs = {}, {}
    for name, fn in (("xla", xla), ("fused", fused)):
      outs[name], kernels = profiler.measure(fn, aggregate=False)(q, k, v)
      per = len(kernels) // STEPS
      steps = [sum(ms for _, ms in kernels[i * per:(i + 1) * per]) * 1e3 for i in range(STEPS)]
      times[name] = (statistics.median(steps[2:]), per)
    ref = [attend(q[i].astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask,
                  implementation="xla", scale=scale) for i in range(STEPS)]
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - r))) for a, r in zip(outs["fused"], ref))
    (x, xk), (f, _) = times["xla"], times["fused"]
    print(f"{slots:6} {parts(slots):5} {x:7.1f} {xk:7} {f:8.1f} {f / x:9.2f} {diff:10.4f}", flush=True)


if __name__ == "__main__":
  main()
