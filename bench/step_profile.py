"""Per-kernel GPU time of one training step (CUPTI), summed by kernel name: where a step's time goes.

A Llama shape with fewer layers (default: 8 layers of llama-65b, batch 1 x 2048, bf16 LoRA r=64,
cuDNN attention, full remat, optimizer state on the device) so that it fits beside the profiler;
per-layer costs scale to the full depth. Prints the wall time of the compiled step, the summed
kernel time and the top kernels; --json keeps them, --hlo the compiled program (to look the
fusion names up).

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/step_profile.py --layers 8
"""

import argparse
import collections
import json
import statistics
import time

import jax
from flax import nnx
from jax.experimental.mosaic.gpu import profiler

from bench.train_step import SHAPES, random_batch
from qlora_jax.lora import LoraConfig
from qlora_jax.model import ModelOptions
from qlora_jax.model_config import ModelConfig
from qlora_jax.optimizer import init_optimizer, make_optimizer
from qlora_jax.train_config import TrainConfig
from qlora_jax.train_step import make_train_step, to_device_batch
from qlora_jax.weights import random_model


def kernels_by_name(fn, *args) -> tuple:
  """(fn's outputs, [(ms, calls, kernel name)] of one call, summed by name, largest first): CUPTI."""
  out, kernels = profiler.measure(fn, aggregate=False)(*args)
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for name, ms in kernels:
    by_name[name][0] += 1
    by_name[name][1] += ms
  return out, sorted(((ms, n, name) for name, (n, ms) in by_name.items()), reverse=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="llama-65b", choices=sorted(SHAPES))
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--json")
  p.add_argument("--hlo")
  args = p.parse_args()
  cfg = ModelConfig(model_type="llama", **dict(SHAPES[args.model], num_hidden_layers=args.layers))
  options = ModelOptions(lora=LoraConfig(rank=64, alpha=16.0, dropout=0.0, param_dtype="bfloat16"),
                         remat="full", scan_layers=True, attention="cudnn")
  graphdef, lora, rng, frozen = nnx.split(random_model(cfg, options), nnx.LoRAParam, nnx.RngState, ...)
  tx, _ = make_optimizer(TrainConfig(model_dir="-", dataset="-", steps=1000, warmup_ratio=0.0))
  opt = init_optimizer(tx, lora)
  step = make_train_step(graphdef, tx).programs["whole"]
  data = to_device_batch(random_batch(cfg.vocab_size, 1, 1, args.seq))

  def run(lora, rng, opt, frozen, data):
    return step(lora, rng, opt, frozen, data)

  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(jax.jit(run).lower(lora, rng, opt, frozen, data).compile().as_text())
  walls = []
  for i in range(5):
    t0 = time.perf_counter()
    lora, rng, opt, metrics = step(lora, rng, opt, frozen, data)
    jax.block_until_ready(metrics)
    walls.append(time.perf_counter() - t0)
  (lora, rng, opt, _), rows = kernels_by_name(run, lora, rng, opt, frozen, data)
  total = sum(ms for ms, _, _ in rows)
  print(f"{args.model} x {args.layers} layers: step {statistics.median(walls[2:]) * 1e3:.1f} ms wall, "
        f"{total:.1f} ms of kernels")
  for ms, n, name in rows[:args.top]:
    print(f"  {ms:8.2f} ms {n:5d}x {name[:100]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "layers": args.layers, "wall_ms": statistics.median(walls[2:]) * 1e3,
                 "kernel_ms": total, "kernels": [(ms, n, name) for ms, n, name in rows]}, f, indent=1)


if __name__ == "__main__":
  main()
