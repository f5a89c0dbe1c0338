"""Does an in-program host->device copy overlap compute when it is independent of it?

A scan over L iterations; each does a [M, K] x [K, N] matmul chain (compute) and reads one
[rows, D] slice of a pinned_host stack (copy). Variants: compute only, copy only, both with the
slice used by the same iteration (no overlap possible), both with the slice prefetched one
iteration ahead (carried). Prints median ms of each.

  python bench/host_prefetch_probe.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

L, ROWS, D, M = 8, 8192, 4096, 8192


def timed(fn, *args, n=5):
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append((time.perf_counter() - t) * 1e3)
  return statistics.median(out)


def main():
  dev = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  devs = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  stack = jax.device_put(jnp.ones((L, ROWS, D), jnp.bfloat16), host)
  w = jnp.ones((D, D), jnp.bfloat16) * 0.001
  x0 = jnp.ones((M, D), jnp.bfloat16)

  def work(x):
    for _ in range(4):
      x = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return x

  def fetch(i):
    return jax.device_put(jax.lax.dynamic_index_in_dim(stack, i, keepdims=False), devs)

  @jax.jit
  def compute_only(x):
    return jax.lax.scan(lambda x, i: (work(x), None), x, jnp.arange(L))[0]

  @jax.jit
  def copy_only(x):
    return jax.lax.scan(lambda x, i: (x + fetch(i)[:1].sum(), None), x, jnp.arange(L))[0]

  @jax.jit
  def same_iteration(x):
    return jax.lax.scan(lambda x, i: (work(x + fetch(i)[:1]), None), x, jnp.arange(L))[0]

  @jax.jit
  def prefetched(x):
    def body(carry, i):
      x, cur = carry
      nxt = fetch(jnp.minimum(i + 1, L - 1))
      return (work(x + cur[:1]), nxt), None
    return jax.lax.scan(body, (x, fetch(0)), jnp.arange(L))[0][0]

  rows = [(name, timed(fn, x0)) for name, fn in (("compute only", compute_only), ("copy only", copy_only),
                                               ("same iteration", same_iteration), ("prefetched", prefetched))]
  gib = L * ROWS * D * 2 / 2**30
  print(f"device {dev.device_kind}, jax {jax.__version__}: {L} iterations, copies {gib:.2f} GiB in all")
  for name, ms in rows:
    print(f"  {name:15s} {ms:8.2f} ms")


if __name__ == "__main__":
  main()
