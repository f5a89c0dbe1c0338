"""What a decode launch gains when its weights are already in L2 (the upper bound of prefetching
them under the small kernels before it): llama3-8b's four decode groups (LoRA r=64), each launch's
kernel time (CUPTI) when every launch reads another copy of the weights (cold: 8 copies, 67-470 MB,
past the H100's 50 MB L2) against every launch reading the copy the launch before it read (warm);
and cold with every warpgroup waiting for the tables before the pipeline (tables_first, the kernel
before 2026-12-07's fourteenth session).

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python bench/device/l2_warm.py
"""
import dataclasses
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels import gpu_decode
from qlora_jax.format.quantization import quantize

GROUPS = {"q,k,v": ((4096, 1024, 1024), 4096), "o": ((4096,), 4096),
          "gate,up": ((14336, 14336), 4096), "down": ((4096,), 14336)}
COPIES, CALLS, RANK = 8, 16, 64


def weights(ns, k, seed):
  keys = jax.random.split(jax.random.key(seed), len(ns))
  return tuple(quantize(jax.random.normal(key, (n, k), jnp.float32) * 0.02) for key, n in zip(keys, ns))


def main():
  print(f"{'group':8} {'MB':>6} {'tables_first':>12} {'cold µs':>8} {'warm µs':>8} {'warm/cold':>9}")
  for name, (ns, k) in GROUPS.items():
    copies = [weights(ns, k, c) for c in range(COPIES)]
    mb = sum(qw.codes.size + qw.absmax.size for qw in copies[0]) / 1e6
    h = jax.random.normal(jax.random.key(1), (8, len(ns) * RANK), jnp.bfloat16)
    bs = tuple(jax.random.normal(jax.random.key(2), (RANK, n), jnp.bfloat16) * 0.1 for n in ns)
    xs = jax.random.normal(jax.random.key(3), (CALLS, 1, k), jnp.bfloat16)

    def run(xs, copies, warm, config):
      return [gpu_decode.decode_group(xs[i], copies[0 if warm else i % COPIES], (h, bs), config=config)
              for i in range(CALLS)]

    times = {}
    for first, warm in ((True, False), (False, False), (False, True)):
      config = dataclasses.replace(gpu_decode.config_for(1, k, RANK), tables_under_pipeline=not first)
      _, kernels = profiler.measure(lambda xs, c: run(xs, c, warm, config), aggregate=False)(xs, copies)
      mosaic = [ms * 1e3 for kernel, ms in kernels if "mosaic" in kernel]
      times[first, warm] = statistics.median(mosaic[2:])  # the first launches: no earlier read
    cold, warm = times[False, False], times[False, True]
    print(f"{name:8} {mb:6.1f} {times[True, False]:12.1f} {cold:8.1f} {warm:8.1f} {warm / cold:9.2f}",
          flush=True)
    del copies


if __name__ == "__main__":
  main()
