"""What the benchmarks share: named shapes, random batches, a random-weight model built for
training through the library's one builder, the generation benchmarks' model, wall-clock timing
and peak device memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from pallas_kernels.backends import get_backend
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import CausalLM, ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.testing import SHAPES, random_model, shape_config
from qlora_jax.train.builder import Trainable, build
from qlora_jax.train.config import OptimConfig

__all__ = ["SHAPES", "bench_optim", "generation_model", "median_seconds", "peak_gib", "random_batch",
           "random_trainable", "shape_config", "time_step", "timings"]


def bench_optim(**changes) -> OptimConfig:
  """The optimizer every bench trains with: the recipe's AdamW and clipping, no warmup."""
  return OptimConfig(**{"steps": 1000, "warmup_ratio": 0.0, **changes})


def random_trainable(config, options: ModelOptions, optim: OptimConfig | None = None, *,
                     layout=None, seed: int = 0, host_embedding: bool = False) -> Trainable:
  """A random-weight model (4-bit from the start, straight into `layout`) ready to train."""
  return build(random_model(config, options, seed, layout), optim or bench_optim(), layout,
               host_embedding=host_embedding)


def generation_model(shape: dict, backend: str = "auto", *, rank: int = 64, scan: bool = False) -> CausalLM:
  """A random NF4 + double-quant Llama of `shape` (SHAPES' fields) with LoRA r=`rank` (alpha 16,
  no dropout; 0: none) on the 7 projections, as the generation benchmarks run it."""
  options = ModelOptions(lora=LoraConfig(rank=rank, alpha=16.0, dropout=0.0) if rank else None,
                         backend=get_backend(backend), scan_layers=scan)
  return random_model(ModelConfig(**{"model_type": "llama", **shape}), options)


def random_batch(vocab: int, micro_batches: int, rows: int, seq: int) -> dict[str, np.ndarray]:
  """Random tokens as the trainer's unpacked batches come: [micro_batches, rows, seq], one
  sequence a row (no segment ids)."""
  ids = np.random.default_rng(0).integers(0, vocab, (micro_batches, rows, seq + 1)).astype(np.int32)
  return {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (micro_batches, rows, seq)).copy()}


def timings(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
  """Wall seconds of `repeats` calls of fn after `warmup` untimed ones; each call's result is
  waited for (jax.block_until_ready) inside its own timing."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def median_seconds(fn: Callable[[], object], repeats: int = 4, warmup: int = 1) -> float:
  return statistics.median(timings(fn, repeats, warmup))


def time_step(trainable: Trainable, batch: dict, steps: int) -> tuple[float, float, dict]:
  """(seconds of the first step: compile + one step, median step seconds over `steps` after 2
  warm-up steps, last metrics). steps=0: two steps, the second timed (long rows, where a step
  takes a minute and the question is whether it runs at all)."""
  metrics = {}

  def one():
    metrics.update(trainable.train_step(batch))
    return trainable.lora, trainable.opt_state, metrics

  times = timings(one, steps + 2)
  return times[0], statistics.median(times[2:] if steps else times[1:]), metrics


def peak_gib(device=None) -> float:
  """The device's peak bytes in use so far, in GiB (0 where it reports none, as on CPU)."""
  stats = (device or jax.devices()[0]).memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30
