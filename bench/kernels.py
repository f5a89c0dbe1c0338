"""Benchmark the fused 4-bit kernels on one GPU and print one table.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/kernels.py [--quick] [--json out.json]

Training shapes (M = 8192 rows): TFLOP/s of our forward (Y = X W^T) and backward (dX = dY W)
kernels (pallas_kernels/gpu_matmul.py, bf16 results), with and without the per-call operand
preparation (fragment-order codes + decoded scales, see pallas_kernels/layout.py), against a bf16
jnp.dot of the same shape with a bf16 result (cuBLAS) and the XLA dequantize-then-matmul path.
Decode shapes (M = 1..64, pallas_kernels/gpu_decode.py): effective GB/s, counting the bytes a fused
kernel must read (4-bit codes, 8-bit absmax codes, nested absmax, activations) and write (the
float32 output) for the `pallas` backend's forward ("ours") and gpu_decode.decode itself
("kernel": the same ops without the dispatch), against the device's measured copy bandwidth and
bitsandbytes' 4-bit matmul (when `bitsandbytes` and torch with CUDA are importable). Kernel
times come from CUPTI (the sum of the GPU kernels a call launches, median of repeated calls);
every result is checked against the XLA path first. Training rows are also timed *sustained*
(back-to-back calls for seconds, wall time, with the SM clock and power nvidia-smi reports): an
H100 holds its power cap under such load by lowering its clock, differently for each kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import gpu, gpu_decode, gpu_matmul, layout
from pallas_kernels.backends import get_backend
from qlora_jax.format.quantization import QuantConfig, dequantize
from qlora_jax.testing import random_quantized

TRAIN_SHAPES = [  # (N, K): llama3-1b/8b, llama-65b and a 70B-sized MLP
    (2048, 2048), (8192, 2048), (2048, 8192), (4096, 4096), (1024, 4096), (14336, 4096),
    (4096, 14336), (8192, 8192), (22016, 8192), (8192, 22016), (28672, 8192)]
DECODE_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (22016, 8192)]
TABLE = layout.codebook("nf4")


def gpu_ms(fn, *args, iterations: int = 20) -> float:
  """Median over `iterations` calls of the summed GPU kernel time of one call (CUPTI)."""
  from jax.experimental.mosaic.gpu import profiler
  jax.block_until_ready(fn(*args))
  _, times = profiler.measure(fn, iterations=iterations)(*args)
  return statistics.median(times)


def sustained(fn, *args, seconds: float = 2.0) -> dict:
  """Back-to-back calls for `seconds` (after a warm-up of the same length), as a training run
  issues them: wall ms per call, and the median SM clock (MHz) and power (W) that nvidia-smi saw
  meanwhile. Under sustained load an H100 holds its 700 W cap by lowering its clock, so these
  times, not the short bursts gpu_ms measures at boost clocks, are what training gets."""
  def run(duration):
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
      for _ in range(10):
        out = fn(*args)
      calls += 10
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls

  run(seconds)
  try:
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                            "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
  except OSError:
    smi = None
  ms = run(seconds) * 1e3
  if smi is None:
    return {"ms": ms}
  smi.terminate()
  samples = [tuple(map(float, line.split(","))) for line in smi.communicate()[0].splitlines()
             if line.count(",") == 1]
  mid = samples[len(samples) // 4:] or samples  # past the clock's settling
  return {"ms": ms, "MHz": statistics.median(v[0] for v in mid),
          "W": statistics.median(v[1] for v in mid)}


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def ceilings() -> dict:
  x = jax.random.bits(jax.random.key(0), (1 << 29,), jnp.uint32)  # 2 GiB
  copy_ms, read_ms = gpu_ms(jax.jit(lambda v: v ^ 1), x), gpu_ms(jax.jit(jnp.bitwise_xor.reduce), x)
  a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
  mm_ms = gpu_ms(jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32)), a, a.T)
  return {"copy_GBps": 2 * x.nbytes / copy_ms / 1e6, "read_GBps": x.nbytes / read_ms / 1e6,
          "matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def past_l2(nbytes: int) -> int:
  """How many weights of `nbytes` a decode row rotates over: 100 MB, twice the H100's 50 MB L2,
  so that nothing is served from it."""
  return max(2, -(-100 * 2**20 // nbytes))


def weight(n: int, k: int, seed: int):
  return random_quantized(jax.random.key(seed), (n, k), QuantConfig())


def train_rows(m: int, shapes, products=("fwd", "bwd")) -> list[dict]:
  """"ours" is the `pallas` qmatmul backend, the path a model takes (operand preparation + kernel)."""
  xla, ours = get_backend("xla"), get_backend("pallas")
  rows = []
  for n, k in shapes:
    qw = weight(n, k, n + k)
    w = jax.jit(lambda q: dequantize(q, jnp.bfloat16))(qw)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (m, n), jnp.bfloat16)
    ops = {  # name: (activation, product, cuBLAS equivalent with our output dtype)
        "fwd": (x, "forward", lambda a, wd: jnp.dot(a, wd.T, preferred_element_type=jnp.bfloat16)),
        "bwd": (dy, "backward", lambda a, wd: jnp.dot(a, wd, preferred_element_type=jnp.bfloat16)),
    }
    for name, (a, product, cublas) in ops.items():
      if name not in products:
        continue
      operands, kernel = layout.gpu_operands(qw, product), getattr(gpu_matmul, product)
      fused = jax.jit(lambda a_, q, p=product: getattr(ours, p)(a_, q, jnp.bfloat16))
      ref = jax.jit(lambda a_, q, p=product: getattr(xla, p)(a_, q, jnp.bfloat16))
      err = rel_err(fused(a, qw), ref(a, qw))
      flops = 2 * m * n * k
      cublas = jax.jit(cublas)
      t = {"ours": gpu_ms(fused, a, qw),
           "kernel": gpu_ms(jax.jit(lambda a_, c, s: kernel(a_, c, s, table=TABLE)), a, *operands),
           "cublas": gpu_ms(cublas, a, w), "xla": gpu_ms(ref, a, qw)}
      held = {key: sustained(f, *args) for key, (f, args) in
              {"ours": (fused, (a, qw)), "cublas": (cublas, (a, w)), "xla": (ref, (a, qw))}.items()}
      rows.append({"op": name, "M": m, "N": n, "K": k, "rel_err": err,
                   **{f"{key}_ms": v for key, v in t.items()},
                   **{f"{key}_TFLOPs": flops / v / 1e9 for key, v in t.items()},
                   **{f"{key}_sustained_TFLOPs": flops / v["ms"] / 1e9 for key, v in held.items()},
                   **{f"{key}_sustained_{unit}": v[unit] for key, v in held.items()
                      for unit in ("MHz", "W") if unit in v}})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def bnb_decode_ms(m: int, n: int, k: int, copies: int) -> float | None:
  try:
    import bitsandbytes as bnb
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  g = torch.Generator(device="cuda").manual_seed(0)
  ws = [bnb.functional.quantize_4bit(
      torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
      quant_type="nf4", compress_statistics=True) for _ in range(copies)]
  x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)

  def run():
    for qw, state in ws:
      bnb.matmul_4bit(x, qw.t(), quant_state=state)

  for _ in range(3):
    run()
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    run()
  times = []
  for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / copies)
  return statistics.median(times)


def decode_rows(ms, shapes, copy_gbps: float) -> list[dict]:
  xla, pallas = get_backend("xla"), get_backend("pallas")
  rows = []
  for n, k in shapes:
    copies = past_l2(n * k // 2)
    qws = [weight(n, k, s) for s in range(copies)]
    for m in ms:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      ours = jax.jit(lambda a, qs: [pallas.forward(a, q, jnp.bfloat16) for q in qs])
      ref = jax.jit(lambda a, qs: [xla.forward(a, q, jnp.bfloat16) for q in qs])
      err = rel_err(ours(x, qws[:1])[0], ref(x, qws[:1])[0])
      kernel = jax.jit(lambda a, qs: [gpu_decode.decode(a, q) for q in qs])
      nbytes = n * k // 2 + n * k // 64 + 4 * -(-n * k // 64 // 256) + 2 * m * k + 4 * m * n
      t = {"ours": gpu_ms(ours, x, qws) / copies, "kernel": gpu_ms(kernel, x, qws) / copies,
           "xla": gpu_ms(ref, x, qws) / copies}
      bnb_ms = bnb_decode_ms(m, n, k, copies)
      if bnb_ms is not None:
        t["bnb"] = bnb_ms
      row = {"op": "decode", "M": m, "N": n, "K": k, "rel_err": err,
             **{f"{key}_us": v * 1e3 for key, v in t.items()},
             **{f"{key}_GBps": nbytes / v / 1e6 for key, v in t.items()}}
      row["ours_of_copy"] = row["ours_GBps"] / copy_gbps
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def _decode_kernel_gbps(n: int, k: int, config, split) -> float:
  """GB/s (bytes of M = 1) of the decode kernel alone on weights rotated past the L2: no x
  permutation, no combining of the CTAs' stores."""
  copies = past_l2(n * k // 2)
  qws = [weight(n, k, s) for s in range(copies)]
  x = jax.random.normal(jax.random.key(0), (64, k), jnp.bfloat16)
  call = functools.partial(gpu_decode._call, table=TABLE, config=config,
                           parts=(gpu_decode.Part(split, 0, 0),), out_cols=8, interpret=False)
  lut = jnp.asarray(gpu_decode.pair_table(TABLE, wide=config.wide_table))
  fn = jax.jit(lambda a, qs: [call(a[:config.cols], ((q.codes.reshape(n, k // 2),
                                                      *gpu_decode.absmax_operands(q), ()),), lut)
                              for q in qs])
  nbytes = n * k // 2 + n * k // 64 + 2 * k + 4 * n
  return nbytes / (gpu_ms(fn, x, qws) / copies) / 1e6


@contextlib.contextmanager
def _compute_registers(regs: int | None):
  """Probe only: Mosaic's warp-specialized pipeline gives one compute warpgroup 256 registers a
  thread (its rule assumes one CTA holds the SM's whole register file), which keeps a second CTA
  off the SM; `regs` (with the memory warpgroup's 40: 256 a thread slot, half the file a CTA)
  overrides that rule while a kernel is traced. None: Mosaic's rule."""
  from jax._src.pallas.mosaic_gpu import pipeline
  rule = pipeline._compute_registers
  if regs is not None:
    pipeline._compute_registers = lambda memory_registers, num_compute_wgs: regs
  try:
    yield
  finally:
    pipeline._compute_registers = rule


def tune_decode() -> None:
  """GB/s of the decode kernel alone per configuration and CTAs per SM. One compute warpgroup a
  CTA with two CTAs an SM gives each warpgroup its own pipeline (code tiles, barriers), the
  structure docs/kernels.md names for the copy rate, if the SM takes two (shared memory: yes with
  the narrow table; registers: as Mosaic sets the launch count); a CTA that does not fit fails
  and the row says why."""
  C = gpu_decode.Config
  configs = [(C(), 1), (C(wide_table=False), 1), (C(stages=4), 1), (C(cols=64, wide_table=False), 1),
             (C(compute_wgs=1, wide_table=False), 1), (C(compute_wgs=1, wide_table=False), 2),
             (C(compute_wgs=1, wide_table=False, stages=4), 2), (C(compute_wgs=1, stages=2), 2)]
  for n, k in [(22016, 8192), (4096, 14336), (14336, 4096), (8192, 8192), (4096, 4096)]:
    res = []
    for (c, per_sm), regs in [(cfg, None) for cfg in configs] + [(configs[5], 216)]:
      split = gpu_decode.split_for(n, k, c, per_sm * gpu.sm_count(False))
      label = f"{c}, {per_sm} a SM ({split.ctas} CTAs{f', compute registers {regs}' if regs else ''})"
      try:
        with _compute_registers(regs):
          res.append(f"{label}: {_decode_kernel_gbps(n, k, c, split):.0f}")
      except Exception as e:  # noqa: BLE001  (a configuration that does not fit: say why, go on)
        res.append(f"{label}: failed: {str(e).splitlines()[0][:100]}")
    print(f"decode N={n} K={k}:\n  " + "\n  ".join(res), flush=True)


def tune_decode_groups() -> None:
  """µs of llama3-8b's weights that share an input, x [1, K] with rank-64 LoRA updates as a layer
  decodes them (x permutation, pads and combines included): one decode call each against one
  decode_group launch, on weights rotated past the L2."""
  k, rank = 4096, 64
  for ns in [(4096, 1024, 1024), (14336, 14336)]:
    copies = past_l2(sum(ns) * k // 2)
    groups = [tuple(weight(n, k, 10 * s + i) for i, n in enumerate(ns)) for s in range(copies)]
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
    h = jax.random.normal(jax.random.key(1), (8, len(ns) * rank), jnp.bfloat16)
    bs = tuple(jax.random.normal(jax.random.key(2), (rank, n), jnp.bfloat16) for n in ns)
    one_each = jax.jit(lambda x, gs: [[gpu_decode.decode(x, q, (h[:, i * rank:(i + 1) * rank], b))
                                       for i, (q, b) in enumerate(zip(g, bs))] for g in gs])
    grouped = jax.jit(lambda x, gs: [gpu_decode.decode_group(x, g, (h, bs)) for g in gs])
    times = [1e3 * gpu_ms(fn, x, groups) / copies for fn in (one_each, grouped)]
    print(f"decode group N={ns} K={k}: one call each {times[0]:.1f} µs, one launch "
          f"{times[1]:.1f} µs ({times[0] / times[1]:.2f}x)", flush=True)


def tune_ragged() -> None:
  """GB/s of the decode kernel alone: stream-K shares that divide the (row tile, step) pairs
  (fewer CTAs) against the default ragged ones (the last CTA's share runs past the end)."""
  config = gpu_decode.Config()
  print("| N x K | dividing: CTAs x steps, GB/s | ragged: CTAs x steps, GB/s |")
  for n, k in [(11008, 4096), (4096, 11008), (28672, 8192), (22016, 8192), (14336, 4096)]:
    ragged = gpu_decode.split_for(n, k, config, gpu.sm_count(False))
    per_cta = next(p for p in range(ragged.per_cta, ragged.total + 1) if ragged.total % p == 0)
    dividing = dataclasses.replace(ragged, ctas=ragged.total // per_cta, per_cta=per_cta)
    cells = [f"{s.ctas} x {s.per_cta}, {_decode_kernel_gbps(n, k, config, s):.0f}"
             for s in (dividing, ragged)]
    print(f"| {n} x {k} | " + " | ".join(cells) + " |", flush=True)


def tune_ceilings() -> None:
  """What any kernel reading a decode shape's bytes can reach: an XLA copy (GB/s of read + write)
  and an XLA reduction (GB/s read) of a buffer as large as the codes and absmax codes, rotated
  past the L2 like the decode rows, against the same for 2 GiB."""
  ceil = ceilings()
  print(f"2 GiB: copy {ceil['copy_GBps']:.0f}, read {ceil['read_GBps']:.0f} GB/s", flush=True)
  for n, k in DECODE_SHAPES:
    nbytes = n * k // 2 + n * k // 64
    copies = past_l2(nbytes)
    bufs = [jax.random.bits(jax.random.key(s), (nbytes // 4,), jnp.uint32) for s in range(copies)]
    copy = gpu_ms(jax.jit(lambda bs: [b ^ 1 for b in bs]), bufs) / copies
    read = gpu_ms(jax.jit(lambda bs: [jnp.bitwise_xor.reduce(b) for b in bs]), bufs) / copies
    print(f"{n} x {k} ({nbytes / 1e6:.1f} MB): copy {1e3 * copy:.1f} µs, "
          f"{2 * nbytes / copy / 1e6:.0f} GB/s; read {1e3 * read:.1f} µs, "
          f"{nbytes / read / 1e6:.0f} GB/s", flush=True)


def tune_prep() -> None:
  """µs of the per-call operand preparation (layout.gpu_operands) per training shape."""
  for n, k in TRAIN_SHAPES:
    qw = weight(n, k, n + k)
    cells = [f"{p} {1e3 * gpu_ms(jax.jit(lambda q, p=p: layout.gpu_operands(q, p)), qw):.1f}"
             for p in ("forward", "backward")]
    print(f"prep N={n} K={k}: " + ", ".join(cells) + " µs", flush=True)


def tune(m: int) -> None:
  """TFLOP/s of the training kernels for a few configurations (kernel + output transpose)."""
  C = gpu_matmul.Config
  configs = [C(), C(persistent=False), C(stages=3), C(cols=128)]
  for n, k in [(4096, 4096), (8192, 8192), (2048, 2048)]:
    qw = weight(n, k, 0)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (m, n), jnp.bfloat16)
    for config in configs:
      res = []
      for name, a in (("forward", x), ("backward", dy)):
        fn, ops = getattr(gpu_matmul, name), layout.gpu_operands(qw, name)
        try:
          ms = gpu_ms(jax.jit(lambda a_, c, s: fn(a_, c, s, table=TABLE, config=config)), a, *ops)
          res.append(f"{name} {2 * m * n * k / ms / 1e9:.0f}")
        except Exception as e:  # noqa: BLE001  (a config that does not fit: say why, go on)
          res.append(f"{name} failed: {str(e).splitlines()[0][:80]}")
      print(f"N={n} K={k} {config}: " + ", ".join(res), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="three training and two decode shapes")
  p.add_argument("--m", type=int, default=8192, help="rows of the training shapes")
  p.add_argument("--decode-only", action="store_true", help="skip the training shapes")
  p.add_argument("--train-only", action="store_true", help="skip the decode shapes")
  p.add_argument("--tune", choices=["train", "decode", "decode_groups", "ragged", "prep", "ceilings"],
                 help="only compare tile configurations (ragged: the decode kernel's stream-K shares)")
  p.add_argument("--ops", default="fwd,bwd", help="training products to time: fwd, bwd or both")
  p.add_argument("--json", help="write all rows here")
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
  if args.tune:
    {"decode": tune_decode, "decode_groups": tune_decode_groups, "ragged": tune_ragged, "prep": tune_prep,
     "ceilings": tune_ceilings}.get(args.tune, lambda: tune(args.m))()
    return
  ceil = ceilings()
  print(json.dumps(ceil), flush=True)
  train = TRAIN_SHAPES[3:6] if args.quick else TRAIN_SHAPES
  decode = DECODE_SHAPES[:2] if args.quick else DECODE_SHAPES
  if args.decode_only:
    train = []
  if args.train_only:
    decode = []
  rows = (train_rows(args.m, train, args.ops.split(","))
          + decode_rows((1, 4, 16, 64), decode, ceil["copy_GBps"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": dev.device_kind, "jax": jax.__version__, **ceil, "rows": rows}, f, indent=1)
  print(f"\ncopy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
  print(f"{'op':6} {'M':>5} {'N':>6} {'K':>6} {'err':>8} | {'ours':>7} {'kernel':>7} {'cuBLAS':>7} "
        f"{'xla':>7} {'ours/cuBLAS':>11} | sustained: {'ours':>5} {'cuBLAS':>7} {'xla':>5} "
        f"{'ours/cuBLAS':>11}  (TFLOP/s)")
  for r in rows:
    if r["op"] != "decode":
      print(f"{r['op']:6} {r['M']:5} {r['N']:6} {r['K']:6} {r['rel_err']:8.1e} | "
            f"{r['ours_TFLOPs']:7.0f} {r['kernel_TFLOPs']:7.0f} {r['cublas_TFLOPs']:7.0f} "
            f"{r['xla_TFLOPs']:7.0f} {r['ours_TFLOPs'] / r['cublas_TFLOPs']:11.0%} | "
            f"{'':11}{r['ours_sustained_TFLOPs']:5.0f} {r['cublas_sustained_TFLOPs']:7.0f} "
            f"{r['xla_sustained_TFLOPs']:5.0f} "
            f"{r['ours_sustained_TFLOPs'] / r['cublas_sustained_TFLOPs']:11.0%}")
  print(f"{'op':6} {'M':>5} {'N':>6} {'K':>6} {'err':>8} | {'ours':>7} {'kernel':>7} {'bnb':>7} "
        f"{'xla':>7} {'of copy':>8}  (GB/s)")
  for r in rows:
    if r["op"] == "decode":
      bnb = f"{r['bnb_GBps']:7.0f}" if "bnb_GBps" in r else "      -"
      print(f"{r['op']:6} {r['M']:5} {r['N']:6} {r['K']:6} {r['rel_err']:8.1e} | "
            f"{r['ours_GBps']:7.0f} {r['kernel_GBps']:7.0f} {bnb} {r['xla_GBps']:7.0f} "
            f"{r['ours_of_copy']:8.0%}")


if __name__ == "__main__":
  main()
