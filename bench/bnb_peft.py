"""Our QLoRA training step against transformers + bitsandbytes + PEFT, side by side, on one GPU.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/bnb_peft.py --model llama3-8b --batch 4

Runs, one subprocess each (so neither framework's allocator sees the other's memory):
  ours         bench/train_step.py (NF4 + DQ base made in 4-bit on the device, cuDNN attention,
               full remat, scanned layers; --offload moves the AdamW moments to pinned host memory)
  bnb ckpt     transformers LlamaForCausalLM + bitsandbytes Linear4bit (NF4, double quant, bf16
               compute) + PEFT LoRA, gradient checkpointing, sdpa attention (the QLoRA recipe)
  bnb          the same without gradient checkpointing (its fastest regime, when memory allows)
Same recipe everywhere: LoRA r=64 alpha=16 dropout 0 on all 7 linear layers, bf16 compute,
AdamW (bnb: paged AdamW 32-bit) lr 2e-4, gradient clipping 0.3, random token batches. Reported:
tokens/s (median of --steps timed steps after 2 warm-up steps), peak device memory (JAX:
peak_bytes_in_use; torch: max_memory_allocated), and the ratios ours / bnb.
The base weights are random: a bf16 matrix is made on the GPU and quantized layer by layer
(bitsandbytes quantizes on the device), so the full bf16 model never exists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu": a smoke test of this script only


def _bnb_model(shape: dict, checkpointing: bool):
  import bitsandbytes as bnb
  import torch
  from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
  from transformers import LlamaConfig, LlamaForCausalLM

  cfg = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0,
                    attn_implementation="sdpa", torch_dtype=torch.bfloat16)
  torch.set_default_dtype(torch.bfloat16)
  with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
  for layer in model.model.layers:  # replace each Linear by a 4-bit one, quantized on the GPU
    for parent in (layer.self_attn, layer.mlp):
      for name, lin in list(parent.named_children()):
        if isinstance(lin, torch.nn.Linear):
          q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                compute_dtype=torch.bfloat16, compress_statistics=True,
                                quant_type="nf4", device="meta")
          w = torch.randn(lin.out_features, lin.in_features, device=DEVICE) * 0.02
          q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4").to(DEVICE)
          setattr(parent, name, q)
  for module in model.modules():  # the rest (embeddings, norms, head): bf16 on the GPU
    is_norm = "norm" in type(module).__name__.lower()
    for pname, p in list(module.named_parameters(recurse=False)):
      if p.device.type == "meta":
        value = (torch.ones(p.shape, device=DEVICE) if is_norm
                 else torch.randn(p.shape, device=DEVICE) * 0.02)
        setattr(module, pname, torch.nn.Parameter(value, requires_grad=False))
  with torch.device(DEVICE):  # the rotary table was made on meta: make it again, for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
  if cfg.tie_word_embeddings:
    model.lm_head.weight = model.model.embed_tokens.weight
  model.is_loaded_in_4bit = True  # what from_pretrained(load_in_4bit=True) sets; PEFT checks it
  model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
  assert model.is_gradient_checkpointing == checkpointing
  lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"])
  model = get_peft_model(model, lora)
  for name, module in model.named_modules():  # qlora.py: LoRA and head in bf16, norms in f32
    if "lora_" in name or "lm_head" in name or "embed_tokens" in name:
      module.to(torch.bfloat16)
    elif "norm" in name:
      module.to(torch.float32)
  torch.set_default_dtype(torch.float32)
  return model


def bnb_step(shape: dict, batch: int, seq: int, steps: int, checkpointing: bool, grad_accum: int = 1) -> dict:
  import bitsandbytes as bnb
  import torch

  model = _bnb_model(shape, checkpointing)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = (bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0) if DEVICE == "cuda"
         else torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0))
  g = torch.Generator(device=DEVICE).manual_seed(0)
  ids = torch.randint(0, shape["vocab_size"], (grad_accum, batch, seq + 1), device=DEVICE, generator=g)
  xs, ys = ids[..., :-1].contiguous(), ids[..., 1:].contiguous()
  on_gpu = DEVICE == "cuda"
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  if on_gpu:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for i in range(steps + 2):
    sync()
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):  # HF Trainer's gradient accumulation: backward per micro-batch
      with torch.autocast(DEVICE, dtype=torch.bfloat16):  # as HF Trainer with bf16=True
        logits = model(input_ids=x).logits
      loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
      (loss / grad_accum).backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    if i >= 2:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {"system": "bnb+peft" + (" ckpt" if checkpointing else ""), "step_s": med,
          "tokens_per_s": grad_accum * batch * seq / med, "grad_accum": grad_accum, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
          "loss": float(loss), "trainable": sum(p.numel() for p in params)}


def _run(cmd: list[str]) -> dict:
  out = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode or not lines:
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    oom = any("out of memory" in ln.lower() or "RESOURCE_EXHAUSTED" in ln for ln in tail)
    return {"error": "out of memory" if oom else " | ".join(tail)}
  return json.loads(lines[-1])


def run_systems(commands: dict[str, list[str]], json_path: str | None, meta: dict) -> dict:
  """Each system's command in its own subprocess (neither framework's allocator sees the other's
  memory): their rows, printed as they come and written with `meta` to json_path."""
  rows = {}
  for system, cmd in commands.items():
    rows[system] = _run(cmd)
    print(system, json.dumps(rows[system]), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump({**meta, "rows": rows}, f, indent=1)
  return rows


def print_table(rows: dict, header: str, cells) -> None:
  """One line per system: `cells(row)` (a string), or the error it ended with."""
  print(header)
  for system, r in rows.items():
    print(f"{system:10} {r['error'] if 'error' in r else cells(r)}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both systems)")
  p.add_argument("--offload", default="no", choices=["no", "yes"], help="ours: optimizer on host")
  p.add_argument("--remat", default="full", help="ours: remat policy (full | offload | save_dots | none)")
  p.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16"],
                 help="ours: LoRA weights and gradients (bnb+PEFT's recipe casts LoRA to bf16)")
  p.add_argument("--systems", default="ours,bnb-ckpt,bnb")
  p.add_argument("--worker", choices=["bnb-ckpt", "bnb"], help=argparse.SUPPRESS)
  p.add_argument("--json")
  args = p.parse_args()
  sys.path.insert(0, HERE)
  from common import SHAPES  # noqa: E402
  shape = SHAPES[args.model]
  if args.worker:
    print(json.dumps(bnb_step(shape, args.batch, args.seq, args.steps, args.worker == "bnb-ckpt",
                              args.grad_accum)))
    return
  commands = {}
  for system in args.systems.split(","):
    if system == "ours":
      commands[system] = [
          sys.executable, os.path.join(HERE, "train_step.py"), "--model", args.model,
          "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
          "--attention", "cudnn", "--offload", args.offload, "--remat", args.remat,
          "--lora-dtype", args.lora_dtype, "--grad-accum", str(args.grad_accum)]
    else:
      commands[system] = [
          sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
          "--seq", str(args.seq), "--steps", str(args.steps), "--worker", system,
          "--grad-accum", str(args.grad_accum)]
  rows = run_systems(commands, args.json, {"model": args.model, "batch": args.batch, "seq": args.seq})
  ours = rows.get("ours", {})
  print(f"\n{args.model} batch {args.batch} x {args.seq}")
  print_table(rows, f"{'system':10} {'tokens/s':>9} {'peak GiB':>9} {'ours/it tok/s':>14} {'ours/it mem':>12}",
              lambda r: f"{r['tokens_per_s']:9.0f} {r['peak_gib']:9.2f} " + (
                  f"{ours['tokens_per_s'] / r['tokens_per_s']:14.2f} {ours['peak_gib'] / r['peak_gib']:12.2f}"
                  if "tokens_per_s" in ours else ""))


if __name__ == "__main__":
  main()
