"""Generation's chunk loop with chunk k + 1 dispatched before chunk k's tokens are read back
(generate.run_chunks) against the loop that reads each chunk back before dispatching the next,
in one process on one model (random NF4 + DQ llama3-8b, LoRA r=64, unrolled): ms a token for
each, (t(9 chunks) - t(1 chunk)) / 128, alternated --rounds times.

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python bench/device/pipeline_ab.py
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from common import SHAPES, generation_model  # noqa: E402
from qlora_jax.nn.generate import CHUNK, greedy_chunk, run_chunks  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--layers", type=int, help="default: the model's")
  p.add_argument("--rounds", type=int, default=5)
  a = p.parse_args()
  model = generation_model({**SHAPES[a.model], **({"num_hidden_layers": a.layers} if a.layers else {})})
  chunk, (state, token, empty, key) = greedy_chunk(model, 1, 64 + 9 * CHUNK)

  def synced(n):  # read each chunk back, then dispatch the next
    cache, tok = jax.tree.map(jnp.copy, empty), token
    for _ in range(n):
      _, sub = jax.random.split(key)  # as run_chunks splits
      tokens, cache = chunk(state, tok, cache, sub)
      tok = tokens[:, -1]
      np.asarray(tokens)

  def pipelined(n):  # generate's loop (all n chunks read back)
    return list(run_chunks(chunk, state, token, jax.tree.map(jnp.copy, empty), key, n))

  def per_token(run):
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(9)
    return 1e3 * ((time.perf_counter() - t1) - (t1 - t0)) / (8 * CHUNK)

  synced(2), pipelined(2)  # compiled
  cache = jax.block_until_ready(jax.tree.map(jnp.copy, empty))
  t0 = time.perf_counter()
  out = chunk(state, token, cache, key)
  t1 = time.perf_counter()
  jax.block_until_ready(out)
  print(f"one chunk: dispatch {1e3 * (t1 - t0):.1f} ms, dispatch to result {1e3 * (time.perf_counter() - t0):.1f} ms")
  rows = {"synced": [], "pipelined": []}
  for _ in range(a.rounds):
    rows["synced"].append(per_token(synced))
    rows["pipelined"].append(per_token(pipelined))
  for name, v in rows.items():
    print(f"{name:10} ms/token median {statistics.median(v):.3f}  all " + " ".join(f"{x:.3f}" for x in v))


if __name__ == "__main__":
  main()
