"""Per-kernel GPU time of one training step (CUPTI), summed by kernel name: where a step's time goes.

A Llama shape with fewer layers (default: 8 layers of llama-65b, batch 1 x 2048, bf16 LoRA r=64,
cuDNN attention, full remat, optimizer state on the device) so that it fits beside the profiler;
per-layer costs scale to the full depth. Prints the wall time of the compiled step, the summed
kernel time and the top kernels; --json keeps them, --hlo the compiled program (to look the
fusion names up).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/step_profile.py --layers 8
"""

import argparse
import collections
import gzip
import json
import pathlib
import statistics
import sys

import jax
from jax.experimental.mosaic.gpu import profiler

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from bench.common import SHAPES, random_batch, random_trainable, timings  # noqa: E402
from pallas_kernels.backends import get_backend  # noqa: E402
from qlora_jax.nn.lora import LoraConfig  # noqa: E402
from qlora_jax.nn.model import ModelOptions  # noqa: E402
from qlora_jax.nn.model_config import ModelConfig  # noqa: E402


def kernels_by_name(fn, *args) -> tuple:
  """(fn's outputs, [(ms, calls, kernel name)] of one call, summed by name, largest first): CUPTI."""
  out, kernels = profiler.measure(fn, aggregate=False)(*args)
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for name, ms in kernels:
    by_name[name][0] += 1
    by_name[name][1] += ms
  return out, sorted(((ms, n, name) for name, (n, ms) in by_name.items()), reverse=True)


def _union(spans: list) -> list:
  out = []
  for a, b in sorted(spans):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return out


def _overlap(spans: list, cover: list) -> float:
  """Microseconds of `spans` that fall inside the union `cover` (both lists of [start, end])."""
  total, j = 0.0, 0
  for a, b in sorted(spans):
    while j < len(cover) and cover[j][1] <= a:
      j += 1
    k = j
    while k < len(cover) and cover[k][0] < b:
      total += min(b, cover[k][1]) - max(a, cover[k][0])
      k += 1
  return total


def copy_overlap(trace_dir: str) -> dict:
  """From a perfetto trace of one step: per copy kind (host to device, device to host), its
  summed time and how much of it ran while a kernel ran (overlapped), plus the span of device
  activity and the time no kernel ran: do the host copies hide behind compute?"""
  path = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
  trace = json.load(gzip.open(path))["traceEvents"]
  gpu = {e["pid"] for e in trace if e.get("ph") == "M" and e.get("name") == "process_name"
         and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  streams = {(e["pid"], e["tid"]) for e in trace if e.get("ph") == "M" and e.get("name") == "thread_name"
             and e.get("pid") in gpu and "stream" in str(e.get("args", {}).get("name", "")).lower()}
  copies = collections.defaultdict(list)
  kernels = []
  names = collections.Counter()
  for e in trace:
    if e.get("ph") != "X" or "dur" not in e or e.get("pid") not in gpu:
      continue
    if streams and (e["pid"], e.get("tid")) not in streams:
      continue  # the XLA-op and module lines over the streams' kernels
    name, span = e["name"].lower(), [e["ts"], e["ts"] + e["dur"]]
    if "memcpy" in name or "memset" in name:
      kind = ("htod" if ("htod" in name or "h2d" in name) else
              "dtoh" if ("dtoh" in name or "d2h" in name) else "other:" + e["name"][:40])
      copies[kind].append(span)
      names[e["name"][:60]] += 1
    else:
      kernels.append(span)
  busy = _union(kernels)
  lo = min(a for a, _ in busy) if busy else 0
  hi = max(b for _, b in busy) if busy else 0
  out = {"kernel_busy_ms": sum(b - a for a, b in busy) / 1e3, "device_span_ms": (hi - lo) / 1e3,
         "copy_names": dict(names.most_common(6))}
  for kind, spans in copies.items():
    out[kind] = {"calls": len(spans), "ms": sum(b - a for a, b in spans) / 1e3,
                 "overlapped_ms": _overlap(spans, busy) / 1e3}
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="llama-65b", choices=sorted(SHAPES))
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--remat", default="full")
  p.add_argument("--mlp-chunk", type=int, default=0)
  p.add_argument("--scan-unroll", type=int, default=1)
  p.add_argument("--lora-dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--json")
  p.add_argument("--hlo")
  p.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla"], help="4-bit matmul backend")
  p.add_argument("--trace", help="a folder: trace one step and report how host copies overlap kernels")
  args = p.parse_args()
  cfg = ModelConfig(**{"model_type": "llama", **SHAPES[args.model], "num_hidden_layers": args.layers})
  options = ModelOptions(lora=LoraConfig(rank=64, alpha=16.0, dropout=0.0, param_dtype=args.lora_dtype),
                         remat=args.remat, mlp_chunk=args.mlp_chunk, scan_layers=True,
                         scan_unroll=args.scan_unroll, attention="cudnn", backend=get_backend(args.backend))
  trainable = random_trainable(cfg, options)
  lora, rng, opt, frozen = trainable.lora, trainable.rng, trainable.opt_state, trainable.frozen
  step = trainable.step.programs["whole"]
  data = trainable.put_batch(random_batch(cfg.vocab_size, 1, args.batch, args.seq))

  def run(lora, rng, opt, frozen, data):
    return step(lora, rng, opt, frozen, data)

  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(jax.jit(run).lower(lora, rng, opt, frozen, data).compile().as_text())
  walls = timings(lambda: trainable.train_step(data), 5)
  lora, rng, opt = trainable.lora, trainable.rng, trainable.opt_state
  (lora, rng, opt, _), rows = kernels_by_name(run, lora, rng, opt, frozen, data)
  total = sum(ms for ms, _, _ in rows)
  overlap = None
  if args.trace:
    jax.block_until_ready(trainable.train_step(data))
    with jax.profiler.trace(args.trace, create_perfetto_trace=True):
      jax.block_until_ready(trainable.train_step(data))
    overlap = copy_overlap(args.trace)
    print("copies:", json.dumps(overlap))
  print(f"{args.model} x {args.layers} layers, {args.batch} x {args.seq}, remat {args.remat}: step {statistics.median(walls[2:]) * 1e3:.1f} ms wall, "
        f"{total:.1f} ms of kernels")
  for ms, n, name in rows[:args.top]:
    print(f"  {ms:8.2f} ms {n:5d}x {name[:100]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "layers": args.layers, "batch": args.batch, "seq": args.seq,
                 "remat": args.remat, "lora_dtype": args.lora_dtype, "wall_ms": statistics.median(walls[2:]) * 1e3,
                 "kernel_ms": total, "copies": overlap, "kernels": [(ms, n, name) for ms, n, name in rows]}, f, indent=1)


if __name__ == "__main__":
  main()
