"""What a training step holds in device memory, from the compiled program alone (no step runs):
XLA's memory analysis of the whole step at each sequence length, so growth with the row is read
off directly (a term that grows faster than the row shows as a rising bytes-per-token).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/step_memory.py --model llama3-8b --seq 32768 65536 \
      --remat offload --attention cudnn

With XLA_FLAGS=--xla_dump_to=DIR the compiler also writes each program's buffer assignment (what
is alive at the peak) there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from bench.common import SHAPES, random_batch, random_trainable  # noqa: E402
from qlora_jax.nn.lora import LoraConfig  # noqa: E402
from qlora_jax.nn.model import ModelOptions  # noqa: E402
from qlora_jax.nn.model_config import ModelConfig  # noqa: E402


def step_memory(trainable, vocab: int, batch: int, seq: int) -> dict:
  """Bytes of the compiled whole step: arguments, outputs, temporaries (device and host)."""
  data = trainable.put_batch(random_batch(vocab, 1, batch, seq))
  program = trainable.step.programs["whole"]
  compiled = program.lower(trainable.lora, trainable.rng, trainable.opt_state, trainable.frozen, data).compile()
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_temp_size_in_bytes")
  out = {f.removesuffix("_size_in_bytes"): getattr(m, f, 0) for f in fields}
  out["temp_bytes_per_token"] = out["temp"] / (batch * seq)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="llama3-1b", choices=sorted(SHAPES))
  p.add_argument("--layers", type=int, default=0, help="0: the shape's own")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, nargs="+", default=[2048])
  p.add_argument("--remat", default="offload")
  p.add_argument("--mlp-chunk", type=int, default=0)
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--embedding", default="device", choices=["device", "host"])
  args = p.parse_args()
  shape = {"model_type": "llama", **SHAPES[args.model]}
  if args.layers:
    shape["num_hidden_layers"] = args.layers
  cfg = ModelConfig(**shape)
  options = ModelOptions(lora=LoraConfig(rank=64, alpha=16.0, dropout=0.0, param_dtype="bfloat16"),
                         remat=args.remat, mlp_chunk=args.mlp_chunk, scan_layers=True,
                         attention=args.attention)
  trainable = random_trainable(cfg, options, host_embedding=args.embedding == "host")
  for seq in args.seq:
    row = {"model": args.model, "layers": cfg.num_hidden_layers, "batch": args.batch, "seq": seq,
           "remat": args.remat, "mlp_chunk": args.mlp_chunk, "embedding": args.embedding,
           **step_memory(trainable, cfg.vocab_size, args.batch, seq)}
    print(json.dumps(row), flush=True)
    print(f"  seq {seq}: temp {row['temp'] / 2**30:.2f} GiB ({row['temp_bytes_per_token'] / 1024:.1f} KiB/token), "
          f"arguments {row['argument'] / 2**30:.2f} GiB, host temp {row['host_temp'] / 2**30:.2f} GiB",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
