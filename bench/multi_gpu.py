"""Time the QLoRA training step sharded over N local devices (random 4-bit weights made straight
into their layout): tokens/s, per-device peak memory, first-step (compile) time, and the start-up memory
estimate beside the measured peak. Each device count runs in its own process (peaks are
per process), one JSON line each.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/multi_gpu.py --model llama3-8b \
      --devices 1,2 --axis fsdp --per-device-batch 4 --seq 2048 --attention cudnn

--devices 1 is the unsharded single-device step (the baseline). The per-device batch is fixed
(weak scaling) unless --global-batch is given (strong scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from bench.common import (SHAPES, bench_optim, random_batch, random_trainable,  # noqa: E402
                          shape_config, time_step)
from qlora_jax.nn.lora import LoraConfig  # noqa: E402
from qlora_jax.nn.sharding import make_layout  # noqa: E402
from qlora_jax.train.config import DataConfig, DeviceConfig, ModelSetup, TrainConfig  # noqa: E402
from qlora_jax.train.memory import estimate  # noqa: E402


def _peaks(devices) -> list[float | None]:
  out = []
  for d in devices:
    stats = d.memory_stats() or {}
    out.append(round(stats["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in stats else None)
  return out


def bench(args, n: int) -> dict:
  mesh = ((args.axis, n),)
  layout = make_layout(mesh, args.lora_sharding)
  shards = layout.batch_shards if layout is not None else 1
  batch = args.global_batch or args.per_device_batch * shards
  if batch % shards:
    sys.exit(f"--global-batch {batch} does not split over {shards} devices")
  model_cfg = shape_config(args.model)
  train_cfg = TrainConfig(model=ModelSetup(model_dir="-", remat=args.remat, attention=args.attention),
                          lora=LoraConfig(rank=args.rank, alpha=16.0, dropout=0.0),
                          data=DataConfig(dataset="-", source_max_len=1, target_max_len=args.seq - 1),
                          optim=bench_optim(batch_size=batch),
                          devices=DeviceConfig(mesh=mesh, lora_sharding=args.lora_sharding))
  options = train_cfg.model_options()
  est = estimate(model_cfg, options, train_cfg, {args.axis: n})
  trainable = random_trainable(model_cfg, options, train_cfg.optim, layout=layout)
  data = trainable.put_batch(random_batch(model_cfg.vocab_size, 1, batch, args.seq), leading=1)
  first_s, med, metrics = time_step(trainable, data, args.steps)
  devices = list(layout.mesh.devices.flat) if layout is not None else [jax.devices()[0]]
  peaks = _peaks(devices)
  return {"model": args.model, "devices": n, "mesh": dict(mesh), "lora_sharding": args.lora_sharding,
          "global_batch": batch, "per_device_batch": batch / shards, "seq": args.seq, "remat": args.remat,
          "attention": args.attention, "rank": args.rank, "step_s": round(med, 4),
          "tokens_per_s": round(batch * args.seq / med, 1),
          "tokens_per_s_per_device": round(batch * args.seq / med / n, 1),
          "peak_gib_per_device": peaks, "peak_gib_max": max((p for p in peaks if p is not None), default=None),
          "estimate_gib": round(est.total / 2**30, 3), "first_step_s": round(first_s, 2),
          "loss": float(metrics["loss"]), "device": devices[0].device_kind, "jax": jax.__version__}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
  p.add_argument("--devices", default="1,2", help="comma-separated device counts, one process each")
  p.add_argument("--axis", default="fsdp", choices=["fsdp", "data"], help="the mesh axis over the devices")
  p.add_argument("--per-device-batch", type=int, default=4)
  p.add_argument("--global-batch", type=int, default=0, help="fixed global batch (strong scaling)")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--remat", default="full")
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--lora-sharding", default="fsdp", choices=["fsdp", "replicated"])
  args = p.parse_args()
  counts = [int(c) for c in args.devices.split(",")]
  if len(counts) == 1:
    if counts[0] > jax.device_count():
      sys.exit(f"--devices {counts[0]}: only {jax.device_count()} device(s) visible")
    print(json.dumps(bench(args, counts[0])), flush=True)
    return
  for n in counts:  # a fresh process per count: peak memory is per process
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "devices"]
    subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--devices={n}"], check=True)


if __name__ == "__main__":
  main()
