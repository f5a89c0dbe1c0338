"""Generation's decode path at llama3-8b's shapes against XLA's, on the device: a random NF4 + DQ
model with llama3-8b's widths (--layers of them) and LoRA B made nonzero, a 64-token prompt, then
--steps one-token decoding steps. Each step's logits of generation's state (decode_state: the
16-bit LoRA copies, scaling in A) under backend auto (the decode kernel) against the model itself
under backend xla (float32 LoRA, no kernel), fed the same tokens; prints the worst relative error
and the greedy tokens' agreement, and exits 1 past --tol.

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python bench/device/decode_check.py
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from common import SHAPES, generation_model  # noqa: E402
from qlora_jax.nn.generate import decode_state  # noqa: E402


def build(model: str, backend: str, layers: int):
  model = generation_model({**SHAPES[model], "num_hidden_layers": layers}, backend)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
    if path[-1] == "lora_b":  # B = 0 at init would hide the LoRA half of the kernel
      v = var.get_value()
      var.set_value(0.02 * jax.random.normal(jax.random.key(100 + i), v.shape, v.dtype))
  nnx.update(model, nnx.state(model, nnx.LoRAParam))
  return model


def logits_fn(graphdef):
  @jax.jit
  def step(state, ids, cache):
    logits, cache = nnx.merge(graphdef, state).decode(ids, cache)
    return logits[:, -1].astype(jnp.float32), cache
  return step


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--tol", type=float, default=0.05)
  a = p.parse_args()
  runs = {}
  for name, backend, gen in (("auto", "auto", True), ("xla", "xla", False)):
    model = build(a.model, backend, a.layers)
    graphdef, state = decode_state(model) if gen else nnx.split(model)
    step = logits_fn(graphdef)
    cache = model.empty_cache(1, 64 + a.steps + 8)
    ids = jnp.asarray([[(7 + 7919 * i) % model.config.vocab_size for i in range(64)]], jnp.int32)
    out = []
    for t in range(a.steps + 1):
      logits, cache = step(state, ids, cache)
      out.append(np.asarray(logits))
      ids = jnp.asarray([[(11 + 104729 * t) % model.config.vocab_size]], jnp.int32)  # same tokens
    runs[name] = np.stack(out)
    del model, state, cache
  got, ref = runs["auto"], runs["xla"]
  err = np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
  agree = (got.argmax(-1) == ref.argmax(-1)).mean()
  print(f"decode_check: {a.layers} layers, rel err per step (0 = prefill): "
        + " ".join(f"{e:.4f}" for e in err.ravel()) + f"; argmax agree {agree:.2f}")
  sys.exit(0 if err.max() <= a.tol else 1)


if __name__ == "__main__":
  main()
