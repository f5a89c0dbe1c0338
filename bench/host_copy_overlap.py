"""Do host <-> device copies inside a scan overlap with the scan's compute? (issue 6's next lever)

80 iterations, each: 12 bf16 matmuls [2048, 8192] x [8192, 8192] (about a 65B layer's forward
work) and an 80 MB fetch of the next iteration's slice of a pinned-host array plus an 80 MB write
back (about a 65B layer's float32 AdamW moments). Prints the median seconds of the compute alone,
the copies alone and both in one scan: both ~ compute means the copies hide under it.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/host_copy_overlap.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

LAYERS, MATMULS, WIDTH, TOKENS = 80, 12, 8192, 2048
SLICE = (2, 10_000_000 // 1024, 1024)  # 2 x 10 M float32: one layer's mu and nu


def programs(host, device):
  """{name: f(x, w, moments) -> (x, moments)} of the three variants."""
  def compute(x, w):
    for k in range(MATMULS):
      x = jnp.dot(x, w[k], preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return x

  def fetch(moments, i):
    return jax.device_put(moments[jnp.minimum(i, LAYERS - 1)], device)

  def compute_only(x, w, moments):
    x, _ = jax.lax.scan(lambda x, i: (compute(x, w), None), x, jnp.arange(LAYERS))
    return x, moments[:1]

  def copies_only(x, w, moments):
    def body(m, i):
      return fetch(moments, i + 1), jax.device_put(m * 0.9 + 0.1, host)
    _, out = jax.lax.scan(body, fetch(moments, 0), jnp.arange(LAYERS))
    return x, out

  def both(x, w, moments):
    def body(carry, i):
      x, m = carry
      return (compute(x, w), fetch(moments, i + 1)), jax.device_put(m * 0.9 + 0.1, host)
    (x, _), out = jax.lax.scan(body, (x, fetch(moments, 0)), jnp.arange(LAYERS))
    return x, out

  return {"compute": compute_only, "copies": copies_only, "both": both}


def main() -> None:
  dev = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  device = host.with_memory_kind("device")
  moments = jax.device_put(jnp.ones((LAYERS, *SLICE), jnp.float32), host)
  w = jnp.full((MATMULS, WIDTH, WIDTH), 1e-3, jnp.bfloat16)
  x = jnp.ones((TOKENS, WIDTH), jnp.bfloat16)
  for name, fn in programs(host, device).items():
    f = jax.jit(fn, out_shardings=(None, host))
    jax.block_until_ready(f(x, w, moments))
    times = []
    for _ in range(4):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, w, moments))
      times.append(time.perf_counter() - t0)
    print(f"{name:8} {statistics.median(times):.3f} s", flush=True)


if __name__ == "__main__":
  main()
