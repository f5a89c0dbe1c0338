"""Time the QLoRA training step on Llama-shaped models with random weights made in 4-bit on the
device: tokens/s (median of timed steps after warm-up), peak device memory, the first step's time (compile + one step).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/train_step.py --model llama3-1b --offload both

Set XLA_PYTHON_CLIENT_PREALLOCATE=false so peak memory is what the step really uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from bench.common import (SHAPES, bench_optim, median_seconds, peak_gib, random_batch,  # noqa: E402
                          random_trainable, shape_config, time_step)
from pallas_kernels.backends import get_backend  # noqa: E402
from qlora_jax.nn.lora import LoraConfig  # noqa: E402
from qlora_jax.nn.model import ModelOptions  # noqa: E402


def bench(model_name: str, batch: int, seq: int, offloaded: bool, remat: str, steps: int, rank: int,
          scan: bool, attention: str, lora_dtype: str = "float32", grad_accum: int = 1,
          backend: str = "auto", mlp_chunk: int = 0, embedding: str = "device", layers: int = 0,
          lora_targets: str = "", loss_chunk: int = 0) -> dict:
  cfg = shape_config(model_name)
  if layers:  # the shape's first `layers` layers (a model too large to build whole elsewhere)
    cfg = dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=cfg.layer_types[:layers])
  targets = {"targets": tuple(lora_targets.split(","))} if lora_targets else {}
  options = ModelOptions(lora=LoraConfig(rank=rank, alpha=16.0, dropout=0.0, param_dtype=lora_dtype, **targets),
                         remat=remat, scan_layers=scan, attention=attention,
                         backend=get_backend(backend), mlp_chunk=mlp_chunk, loss_chunk=loss_chunk)
  trainable = random_trainable(cfg, options, bench_optim(offload_optimizer=offloaded),
                               host_embedding=embedding == "host")
  host_batch = random_batch(cfg.vocab_size, grad_accum, batch, seq)
  data = trainable.put_batch(host_batch)
  first_s, med, metrics = time_step(trainable, data, steps)
  # preparing a batch (with embedding=host, its rows looked up on the host): the trainer does it
  # for step N+1 while the device runs step N
  put_s = median_seconds(lambda: trainable.put_batch(host_batch), 3)
  return {"model": model_name, "batch": batch, "seq": seq, "offload": offloaded, "remat": remat,
          "scan": scan, "attention": attention, "lora_dtype": lora_dtype, "backend": backend,
          "rank": rank, "grad_accum": grad_accum, "layers": cfg.num_hidden_layers,
          "lora_targets": ",".join(options.lora.targets), "mlp_chunk": mlp_chunk, "loss_chunk": loss_chunk,
          "embedding": embedding,
          "put_batch_s": put_s, "step_s": med,
          "tokens_per_s": grad_accum * batch * seq / med, "peak_gib": peak_gib(),
          "first_step_s": first_s, "loss": float(metrics["loss"]),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}


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
  p.add_argument("--mlp-chunk", type=int, default=0, help="tokens per MLP piece (0: whole batch)")
  p.add_argument("--embedding", default="device", choices=["device", "host"],
                 help="where the token-embedding table lives (host: rows looked up by put_batch)")
  p.add_argument("--loss-chunk", type=int, default=0, help="tokens per loss chunk (0: by vocabulary)")
  p.add_argument("--layers", type=int, default=0, help="the shape's first N layers (0: all)")
  p.add_argument("--lora-targets", default="", help="comma-separated LoRA targets (default: the 7 linear layers)")
  args = p.parse_args()
  modes = {"no": [False], "yes": [True], "both": [False, True]}[args.offload]
  for offloaded in modes:
    print(json.dumps(bench(args.model, args.batch, args.seq, offloaded, args.remat, args.steps, args.rank,
                           args.scan, args.attention, args.lora_dtype, args.grad_accum,
                           args.backend, args.mlp_chunk, args.embedding, args.layers,
                           args.lora_targets, args.loss_chunk)), flush=True)


if __name__ == "__main__":
  main()
