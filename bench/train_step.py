"""Time the QLoRA training step on Llama-shaped models with random weights made in 4-bit on the
device: tokens/s (median of timed steps after warm-up), peak device memory, the first step's time (compile + one step).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/train_step.py --model llama3-1b --offload both

Set XLA_PYTHON_CLIENT_PREALLOCATE=false so peak memory is what the step really uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from qlora_jax.lora import LoraConfig
from qlora_jax.model import ModelOptions
from qlora_jax.model_config import ModelConfig
from qlora_jax.train_config import TrainConfig
from qlora_jax.optimizer import init_optimizer, make_optimizer, offload, offload_sharding
from qlora_jax.train_step import make_train_step, to_device_batch
from qlora_jax.weights import random_model

SHAPES = {
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=64),
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama-65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64, head_dim=128),
}


def peak_gib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def random_batch(vocab: int, micro_batches: int, rows: int, seq: int) -> dict[str, np.ndarray]:
  """Random tokens as the trainer's batches come: [micro_batches, rows, seq], one segment a row."""
  ids = np.random.default_rng(0).integers(0, vocab, (micro_batches, rows, seq + 1)).astype(np.int32)
  return {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (micro_batches, rows, seq)).copy(),
          "segment_ids": np.ones((micro_batches, rows, seq), np.int32)}


def time_step(step, state: tuple, data, steps: int) -> tuple[float, float, dict]:
  """(seconds of the first step: compile + one step, median step seconds over `steps` after 2
  warm-up steps, last metrics)."""
  lora, rng, opt_state, frozen = state
  times = []
  for _ in range(steps + 2):
    t0 = time.perf_counter()
    lora, rng, opt_state, metrics = step(lora, rng, opt_state, frozen, data)
    jax.block_until_ready((lora, opt_state, metrics))
    times.append(time.perf_counter() - t0)
  return times[0], statistics.median(times[2:]), metrics


def bench(model_name: str, batch: int, seq: int, offloaded: bool, remat: str, steps: int, rank: int,
          scan: bool, attention: str, lora_dtype: str = "float32", grad_accum: int = 1,
          backend: str = "auto") -> dict:
  cfg = ModelConfig(model_type="llama", **SHAPES[model_name])
  options = ModelOptions(lora=LoraConfig(rank=rank, alpha=16.0, dropout=0.0, param_dtype=lora_dtype), remat=remat,
                         scan_layers=scan, attention=attention, backend=backend)
  model = random_model(cfg, options)
  graphdef, lora, rng, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  train_cfg = TrainConfig(model_dir="-", dataset="-", steps=1000, warmup_ratio=0.0)
  tx, _ = make_optimizer(train_cfg)
  opt_state = init_optimizer(tx, lora)
  sharding = offload_sharding(opt_state) if offloaded else None
  if sharding is not None:
    opt_state = offload(opt_state, sharding, lora)
  step = make_train_step(graphdef, tx, sharding)
  data = to_device_batch(random_batch(cfg.vocab_size, grad_accum, batch, seq))
  first_s, med, metrics = time_step(step, (lora, rng, opt_state, frozen), data, steps)
  return {"model": model_name, "batch": batch, "seq": seq, "offload": offloaded, "remat": remat, "scan": scan,
          "attention": attention, "lora_dtype": lora_dtype, "backend": backend,
          "rank": rank, "grad_accum": grad_accum, "step_s": med, "tokens_per_s": grad_accum * batch * seq / med, "peak_gib": peak_gib(),
          "first_step_s": first_s, "loss": float(metrics["loss"]), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="llama3-1b", choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--remat", default="full")
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--offload", default="no", choices=["no", "yes", "both"])
  p.add_argument("--no-scan", dest="scan", action="store_false", help="unroll the layers")
  p.add_argument("--attention", default="xla", choices=["auto", "xla", "cudnn"])
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
  p.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16"],
                 help="LoRA weights and gradients (moments are float32 either way)")
  p.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla"],
                 help="4-bit matmul backend (pallas: the fused kernels for training shapes too)")
  args = p.parse_args()
  modes = {"no": [False], "yes": [True], "both": [False, True]}[args.offload]
  for offloaded in modes:
    print(json.dumps(bench(args.model, args.batch, args.seq, offloaded, args.remat, args.steps, args.rank,
                           args.scan, args.attention, args.lora_dtype, args.grad_accum,
                           args.backend)), flush=True)


if __name__ == "__main__":
  main()
