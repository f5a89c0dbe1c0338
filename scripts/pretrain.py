"""python scripts/pretrain.py CORPUS OUT [--size 140m] [--tokens N] [--batch B] [--seq T] [--lr X]

Pretrains a Llama-shaped model from scratch on scripts/pretrain_corpus.py's token streams and
saves it as a bf16 transformers checkpoint (OUT: config.json, model.safetensors, the tokenizer,
pretrain_log.json), so that scripts/quality.py can compare QLoRA with 16-bit LoRA on a genuinely
16-bit base (issue 30). PyTorch + transformers, both on the device image: the checkpoint is then
exactly the transformers model that quality.py converts, with nothing of ours in between.

Recipe: AdamW (0.9, 0.95), weight decay 0.1, linear warmup over 2% of the steps then cosine to
10% of the peak, gradient clipping at 1.0, bf16 autocast over float32 master weights (on a CPU
too: fast where it has AMX), random windows of the training stream, held-out loss on fixed
validation windows every --eval-every steps. Progress lines as it goes, a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np

# Llama shapes (tied embeddings; the vocabulary is the corpus tokenizer's).
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=176),
    "140m": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
}


def windows(stream: np.ndarray, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
  starts = rng.integers(0, len(stream) - seq - 1, batch)
  return np.stack([stream[s:s + seq + 1] for s in starts]).astype(np.int64)


def learning_rate(step: int, steps: int, peak: float) -> float:
  warmup = max(1, steps // 50)
  if step < warmup:
    return peak * (step + 1) / warmup
  done = (step - warmup) / max(1, steps - warmup)
  return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def pretrain(corpus: pathlib.Path, out: pathlib.Path, size: str = "140m", tokens: int = 200_000_000,
             batch: int = 32, seq: int = 1024, lr: float = 1e-3, eval_every: int = 200, seed: int = 0,
             progress: bool = True, max_seconds: float = 0.0) -> dict:
  import torch
  import transformers

  meta = json.loads((corpus / "corpus.json").read_text())
  train = np.memmap(corpus / "train.bin", np.uint16, "r")
  val = np.memmap(corpus / "val.bin", np.uint16, "r")
  if len(train) <= seq + 1 or len(val) <= seq + 1:
    raise SystemExit(f"{corpus}: {len(train):,} training / {len(val):,} held-out tokens, fewer than one "
                     f"window of {seq + 1}; build a larger corpus or pass a smaller --seq")
  torch.manual_seed(seed)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  config = transformers.LlamaConfig(vocab_size=meta["vocab"], max_position_embeddings=seq + 1, rope_theta=10000.0,
                                    tie_word_embeddings=True, eos_token_id=meta["eos"], bos_token_id=meta["eos"],
                                    **SIZES[size])
  model = transformers.LlamaForCausalLM(config).to(device)
  params = sum(p.numel() for p in model.parameters())
  decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; norms are not decayed
  rest = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, betas=(0.9, 0.95), fused=cuda)
  steps = max(1, tokens // (batch * seq))
  rng = np.random.default_rng(seed)
  held_out = windows(val, np.random.default_rng(seed + 1), min(64, max(1, len(val) // (seq + 1))), seq)

  def loss_of(ids) -> torch.Tensor:
    ids = torch.from_numpy(ids).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
      return model(input_ids=ids, labels=ids).loss  # seq + 1 tokens: seq predictions

  def evaluate() -> float:
    model.eval()
    with torch.no_grad():
      losses = [float(loss_of(held_out[i:i + batch])) for i in range(0, len(held_out), batch)]
    model.train()
    return float(np.mean(losses))

  log = {"size": size, "parameters": params, "config": SIZES[size], "batch": batch, "seq": seq, "lr": lr,
         "steps": steps, "seed": seed, "corpus": meta, "device": torch.cuda.get_device_name() if cuda else "cpu",
         "torch": torch.__version__, "transformers": transformers.__version__, "train": [], "eval": []}
  if progress:
    print(f"pretraining a {params / 1e6:.0f}M-parameter Llama ({size}) for {steps} steps of {batch} x {seq} "
          f"tokens on {log['device']}", flush=True)
  start = time.perf_counter()
  for step in range(steps):
    for group in opt.param_groups:
      group["lr"] = learning_rate(step, steps, lr)
    loss = loss_of(windows(train, rng, batch, seq))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = float(loss)
    if not math.isfinite(value):
      raise SystemExit(f"loss became {value} at step {step}; lower --lr (now {lr})")
    log["train"].append((step, value))
    out_of_time = bool(max_seconds) and time.perf_counter() - start > max_seconds and step + 1 < steps
    if out_of_time:
      log["stopped_at_step"] = step + 1  # the schedule was cut short; the model is saved as it stands
    if (step + 1) % eval_every == 0 or step + 1 == steps or out_of_time:
      log["eval"].append((step + 1, evaluate()))
      if progress:
        rate = (step + 1) * batch * seq / (time.perf_counter() - start)
        print(f"  step {step + 1}/{steps}: train loss {value:.3f}, held-out loss {log['eval'][-1][1]:.3f}, "
              f"{rate:,.0f} tok/s", flush=True)
    if out_of_time:
      if progress:
        print(f"  stopped at step {step + 1} of {steps}: --max-seconds {max_seconds:g} reached", flush=True)
      break
  log["seconds"] = time.perf_counter() - start
  out.mkdir(parents=True, exist_ok=True)
  model.to(torch.bfloat16).save_pretrained(str(out))
  for f in (corpus / "tokenizer").iterdir():
    shutil.copy(f, out / f.name)
  (out / "pretrain_log.json").write_text(json.dumps(log, indent=1))
  if progress:
    print(f"saved {out}: held-out loss {log['eval'][0][1]:.3f} -> {log['eval'][-1][1]:.3f} "
          f"(perplexity {math.exp(log['eval'][-1][1]):.1f}) after {len(log['train']) * batch * seq:,} tokens in "
          f"{log['seconds'] / 60:.1f} min", flush=True)
  return log


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  p.add_argument("corpus", type=pathlib.Path, help="a scripts/pretrain_corpus.py output folder")
  p.add_argument("out", type=pathlib.Path)
  p.add_argument("--size", default="140m", choices=sorted(SIZES))
  p.add_argument("--tokens", type=int, default=200_000_000, help="training tokens in all")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--eval-every", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-seconds", type=float, default=0.0,
                 help="stop (evaluate and save) once training has run this long; 0: no limit")
  args = p.parse_args(argv)
  if args.max_seconds < 0:
    raise SystemExit(f"--max-seconds must be >= 0 (0: no limit), got {args.max_seconds}")
  if args.out.exists() and any(args.out.iterdir()):
    raise SystemExit(f"{args.out} exists and is not empty; choose another OUT (nothing was overwritten)")
  pretrain(args.corpus, args.out, args.size, args.tokens, args.batch, args.seq, args.lr, args.eval_every, args.seed,
           max_seconds=args.max_seconds)
  return 0


if __name__ == "__main__":
  sys.exit(main())
