"""Would one GEMM per shared input beat one per projection? (issue 25's next lever, measured
before building it.)

A llama3-8b layer's q, k, v projections share their input, as do gate and up. Today each is
its own dequantize + GEMM, and each LoRA adapter its own two small GEMMs. This times, forward +
backward (gradients to x and to the LoRA matrices, the base frozen), on one GPU:

  separate   per projection: dequantize, x @ W^T, x @ A, (x A) @ B
  fused      dequantize the group's weights into one [sum(out) + sum(r), in] matrix (the LoRA As
             stacked under them), one GEMM, then each B on its slice

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/fused_projections_probe.py --tokens 8192

Prints ms per group (median of 20) and the ratio; nothing in the library changes.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from qlora_jax.format.quantization import dequantize, quantize  # noqa: E402

GROUPS = {"q,k,v": (4096, (4096, 1024, 1024)), "gate,up": (4096, (14336, 14336))}


def _median_ms(fn, *args, n: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--rank", type=int, default=64)
  args = p.parse_args()
  key = jax.random.key(0)
  bf16 = jnp.bfloat16
  for name, (d_in, outs) in GROUPS.items():
    qws = [quantize(jax.random.normal(jax.random.fold_in(key, i), (o, d_in), jnp.float32) * 0.02, "nf4", 64, True)
           for i, o in enumerate(outs)]
    a_s = [jax.random.normal(jax.random.fold_in(key, 10 + i), (d_in, args.rank), bf16) * 0.02 for i in range(len(outs))]
    b_s = [jax.random.normal(jax.random.fold_in(key, 20 + i), (args.rank, o), bf16) * 0.02 for i, o in enumerate(outs)]
    x = jax.random.normal(jax.random.fold_in(key, 99), (args.tokens, d_in), bf16)
    gs = [jax.random.normal(jax.random.fold_in(key, 30 + i), (args.tokens, o), bf16) for i, o in enumerate(outs)]

    def separate(qws, x, a_s, b_s):
      outs_ = []
      for qw, a, b in zip(qws, a_s, b_s):
        w = jax.lax.stop_gradient(dequantize(qw, bf16))
        outs_.append(x @ w.T + (x @ a) @ b)
      return outs_

    def fused(qws, x, a_s, b_s):
      w = jax.lax.stop_gradient(jnp.concatenate([dequantize(qw, bf16) for qw in qws], axis=0))
      stacked = jnp.concatenate([w, jnp.concatenate(a_s, axis=1).T], axis=0)  # [sum(out) + n r, in]
      y = x @ stacked.T
      cuts = np.cumsum([*outs, *(args.rank,) * len(outs)])[:-1]
      pieces = jnp.split(y, [int(c) for c in cuts], axis=1)
      base, hs = pieces[:len(outs)], pieces[len(outs):]
      return [yb + h @ b for yb, h, b in zip(base, hs, b_s)]

    def step(f):
      def loss(x, a_s, b_s, qws, gs):  # every array an argument: nothing for XLA to constant-fold
        return sum(jnp.vdot(y.astype(jnp.float32), g.astype(jnp.float32)) for y, g in zip(f(qws, x, a_s, b_s), gs))
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ms = {label: _median_ms(step(f), x, a_s, b_s, qws, gs) for label, f in (("separate", separate), ("fused", fused))}
    print(f"{name} ({args.tokens} tokens, r={args.rank}): separate {ms['separate']:.2f} ms, "
          f"fused {ms['fused']:.2f} ms, fused/separate {ms['fused'] / ms['separate']:.3f}", flush=True)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")


if __name__ == "__main__":
  main()
