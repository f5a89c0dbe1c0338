"""Batch-1 generation (greedy, KV cache) on a Llama-shaped 4-bit model with LoRA attached: ours
against transformers + bitsandbytes + PEFT on the same GPU.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/generate.py --model llama3-8b

Systems, one subprocess each (neither framework's allocator sees the other's memory):
  ours:auto    qlora_jax.nn.generate, the default backend (the Pallas decode kernel on a GPU)
  ours:xla     the same with backend 'xla' (dequantize + dot)
  ours:scan    backend 'auto' with the layers scanned (the trainer's default)
  bnb          transformers' generate on LlamaForCausalLM with bitsandbytes Linear4bit (NF4,
               double quant, bf16 compute) and PEFT LoRA, built as bench/bnb_peft.py builds it
               (the qlora.py recipe: norms in float32, so it runs under bf16 autocast)
  unsloth      Unsloth's generate after FastLanguageModel.for_inference, on the model the
               anchors runner loads (../shared/anchors copied to .anchors: its random bf16
               model saved to disk, loaded in 4 bits, LoRA r=64 on the 7 linear layers); needs
               the runner's wheels on PYTHONPATH (bench/device/session4.sh's `wheels` installs them)
All models: random weights, NF4 + double quant, LoRA r=64 on the 7 linear layers (ours: --rank,
0 for none), bf16 compute. A prompt of --prompt random tokens; the time per generated token is
(t(long) - t(short)) / (long - short) for two generations of --short and --long new tokens
(prefill and compilation cancel), median of --repeats pairs; ours times generation's compiled
chunk of CHUNK decoding steps (generate.run_chunks, the loop generate runs after its prefill: --short and --long
rounded up to whole chunks) from an empty cache, and reports generate's per-call setup
(decode_state: the adapters' 16-bit copies) apart as setup_ms, median of --repeats: its host
time varies by +-0.1 s from call to call, which whole generate calls would fold into the
difference (2026-12-07: 2.9 ms a token against 4.05 ms of kernels). Device memory: resident after the
runs (model, adapters, cache: JAX's bytes_in_use, torch's memory_allocated) and peak (JAX's
peak_bytes_in_use, which includes making the random model; torch's max_memory_allocated since
the model was made).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _progress(line: str) -> None:
  """A line on stderr: a worker killed by its timeout still shows how far it got."""
  print(line, file=sys.stderr, flush=True)


def _per_token(run, short: int, long: int, repeats: int) -> tuple[float, float]:
  """(median seconds per generated token, seconds of the first call); run(n) generates n tokens
  (the first call compiles)."""
  t0 = time.perf_counter()
  run(long)
  first = time.perf_counter() - t0
  _progress(f"first call (compile + {long} tokens) {first:.0f} s")
  pairs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    n_short = run(short) or short  # run may return how many tokens it computed
    t1 = time.perf_counter()
    n_long = run(long) or long
    pairs.append(((time.perf_counter() - t1) - (t1 - t0)) / (n_long - n_short))
  return statistics.median(pairs), first


def ours(shape: dict, variant: str, prompt: list[int], args) -> dict:
  import jax
  import jax.numpy as jnp

  from common import generation_model
  from qlora_jax.nn.generate import CHUNK, decode_state, greedy_chunk, run_chunks

  t0 = time.perf_counter()
  model = generation_model(shape, "xla" if variant == "xla" else "auto", rank=args.rank, scan=variant == "scan")
  _progress(f"ours:{variant}: random model in {time.perf_counter() - t0:.0f} s; timing")

  chunk, (state, token, empty, key) = greedy_chunk(model, 1, len(prompt) + -(-args.long // CHUNK) * CHUNK)

  def run(n):  # generate's loop after the prefill (generate.run_chunks): the tokens computed
    chunks = run_chunks(chunk, state, token, jax.tree.map(jnp.copy, empty), key, -(-n // CHUNK))
    return sum(tokens.shape[1] for tokens in chunks)  # each call donates its cache: a copy

  seconds, first = _per_token(run, args.short, args.long, args.repeats)
  setup = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(decode_state(model)[1])
    setup.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  row = {"system": f"ours:{variant}", "rank": args.rank, "ms_per_token": 1e3 * seconds, "tokens_per_s": 1 / seconds,
         "first_call_s": first, "setup_ms": 1e3 * statistics.median(setup),
         "resident_gib": stats.get("bytes_in_use", 0) / 2**30,
         "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}
  return row | (_profile(model, len(prompt) + args.long) if args.profile else {})


def _profile(model, cache_length: int) -> dict:
  """GPU kernel time of one compiled chunk of decoding steps (CUPTI), per token and by kernel."""
  import jax
  import jax.numpy as jnp

  from qlora_jax.nn.generate import CHUNK, greedy_chunk
  from step_profile import kernels_by_name

  chunk, (state, tokens, cache, key) = greedy_chunk(model, 1, cache_length)
  spare = jax.tree.map(jnp.copy, cache)  # each call donates its cache: one for the measured call
  run = functools.partial(chunk, state, tokens, key=key)
  jax.block_until_ready(run(cache))  # compiled for this cache length
  _, rows = kernels_by_name(run, spare)
  return {"kernel_ms_per_token": sum(ms for ms, _, _ in rows) / CHUNK,
          "kernels_per_token": [(ms / CHUNK, n / CHUNK, name) for ms, n, name in rows]}


def bnb(shape: dict, prompt: list[int], args) -> dict:
  import torch

  from bnb_peft import _bnb_model

  model = _bnb_model(shape, checkpointing=False).eval()
  ids = torch.tensor([prompt], device="cuda")
  mask = torch.ones_like(ids)

  def run(n):  # under autocast, as the recipe's model trains (its norms are float32)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
      model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()

  return _torch_row("bnb+peft", run, args)


def _torch_row(system: str, run, args) -> dict:
  """A torch system's row: run(n) timed as _per_token does, device memory from torch's allocator
  (the peak since the model was made)."""
  import torch

  torch.cuda.reset_peak_memory_stats()
  seconds, first = _per_token(run, args.short, args.long, args.repeats)
  return {"system": system, "first_call_s": first, "ms_per_token": 1e3 * seconds, "tokens_per_s": 1 / seconds,
          "resident_gib": torch.cuda.memory_allocated() / 2**30,
          "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def unsloth(shape_name: str, prompt: list[int], args) -> dict:
  sys.path.insert(0, os.path.join(os.path.dirname(HERE), ".anchors"))
  import anchor_fast  # the anchors runner: its saved random model and Unsloth's loading

  for k, v in anchor_fast.OFFLINE_ENV.items():
    os.environ.setdefault(k, v)
  a = anchor_fast.parse_args(["--system", "unsloth", "--shape", shape_name,
                              "--seq", str(len(prompt) + args.long)])
  path = anchor_fast.ensure_model(a)
  os.makedirs(anchor_fast.WORK_DIR, exist_ok=True)
  os.chdir(anchor_fast.WORK_DIR)  # unsloth writes its compiled cache into the cwd
  import unsloth  # noqa: F401  (before transformers and peft: it patches them)
  import torch
  from unsloth import FastLanguageModel

  model, _ = anchor_fast.load_unsloth(a, path)
  FastLanguageModel.for_inference(model)
  ids = torch.tensor([prompt], device="cuda")
  mask = torch.ones_like(ids)

  def run(n):
    with torch.no_grad():
      model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=3, use_cache=True)
    torch.cuda.synchronize()

  return _torch_row("unsloth", run, args)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
  p.add_argument("--short", type=int, default=16)
  p.add_argument("--long", type=int, default=144)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rank", type=int, default=64, help="ours: LoRA rank (0: no adapters, the base alone)")
  p.add_argument("--systems", default="ours:auto,ours:xla,ours:scan,bnb")
  p.add_argument("--profile", action="store_true",
                 help="ours: also the GPU kernel time of a chunk of steps, per token and by kernel")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--json")
  args = p.parse_args()
  sys.path.insert(0, HERE)
  from bnb_peft import print_table, run_systems  # noqa: E402  (bench/ is not a package)
  from common import SHAPES  # noqa: E402
  shape = SHAPES[args.model]
  prompt = [(7 + 7919 * i) % shape["vocab_size"] for i in range(args.prompt)]  # fixed, spread
  if args.worker:
    if args.worker == "bnb":
      row = bnb(shape, prompt, args)
    elif args.worker == "unsloth":
      row = unsloth(args.model, prompt, args)
    else:
      row = ours(shape, args.worker.split(":")[1], prompt, args)
    print(json.dumps(row))
    return
  rows = run_systems({system: [sys.executable, __file__, "--worker", system, "--model", args.model,
                               "--prompt", str(args.prompt), "--short", str(args.short),
                               "--long", str(args.long), "--repeats", str(args.repeats), "--rank", str(args.rank),
                               *(["--profile"] if args.profile else [])]
                      for system in args.systems.split(",")},
                     args.json, {"model": args.model, "prompt": args.prompt})
  base = rows.get("bnb", {}).get("tokens_per_s")
  for system, r in rows.items():
    if "kernels_per_token" in r:
      print(f"\n{system}: {r['kernel_ms_per_token']:.2f} ms of GPU kernels a token; by kernel (ms, calls):")
      for ms, n, name in r["kernels_per_token"][:30]:
        print(f"  {ms:7.3f} {n:6.1f}x {name[:90]}")
  print(f"\n{args.model}, batch 1, prompt {args.prompt}, greedy")
  print_table(rows, f"{'system':10} {'ms/token':>9} {'tokens/s':>9} {'resident GiB':>13} {'peak GiB':>9} {'vs bnb':>7} {'setup ms':>9}",
              lambda r: f"{r['ms_per_token']:9.2f} {r['tokens_per_s']:9.1f} {r['resident_gib']:13.2f} "
                        f"{r['peak_gib']:9.2f} " + (f"{r['tokens_per_s'] / base:7.2f}" if base else " " * 7)
                        + (f" {r['setup_ms']:9.0f}" if "setup_ms" in r else ""))


if __name__ == "__main__":
  main()
