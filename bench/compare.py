"""Ours against what QLoRA users run instead, in one device run: Unsloth, Liger + bitsandbytes +
PEFT and bitsandbytes + PEFT (the anchors runner, a copy of ../shared/anchors in .anchors/) on the
same random-weight Llama shapes, then one table of tokens/s, peak GiB and our ratios.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/compare.py --shapes llama3-8b:4x2048,llama3-8b:1x32768 \
      --systems ours,unsloth --json docs/results/compare.json

Ours: bench/train_step.py (cuDNN attention; --ours adds its flags, e.g. "--remat offload"), one
process a row. Theirs: `bash .anchors/run.sh`, one process a row. Every row is the median of
--steps timed steps after warm-up; peak = JAX peak_bytes_in_use / torch max_memory_allocated.
--cap-gib N caps every system's device memory (XLA_PYTHON_CLIENT_MEM_FRACTION;
torch.cuda.set_per_process_memory_fraction): the longest row that still trains under the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ANCHOR_SYSTEMS = {"unsloth": "--system unsloth", "liger": "--system liger", "bnb": "anchor_torch"}


def _shape(text: str) -> tuple[str, int, int]:
  """llama3-8b:4x2048 -> ("llama3-8b", 4, 2048)."""
  model, _, size = text.partition(":")
  batch, _, seq = size.partition("x")
  return model, int(batch), int(seq)


def ours(model: str, batch: int, seq: int, steps: int, extra: str, fraction: float = 0.0) -> dict:
  cmd = [sys.executable, str(HERE / "train_step.py"), "--model", model, "--batch", str(batch),
         "--seq", str(seq), "--steps", str(steps), "--attention", "cudnn", *shlex.split(extra)]
  # Under a cap the pool is reserved whole (PREALLOCATE): grown on demand it is several regions, and
  # a step's temporaries (one buffer of ~10 GiB at 98k tokens) found no region to fit in
  # (docs/results/ours_cap24_h100_2026-12-05_98304_fail.txt). The peak reported is still bytes in use.
  cap = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.4f}", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
  env = dict(os.environ, **(cap if fraction else {}))
  return _last_json(subprocess.run(cmd, capture_output=True, text=True, env=env), "ours")


# Unsloth & co. under a device-memory cap: torch's per-process fraction, set as the interpreter
# starts (run.sh puts /tmp/site first on PYTHONPATH), only where TORCH_MEM_FRACTION is set.
CAP_HOOK = """import os
if os.environ.get("TORCH_MEM_FRACTION"):
    import torch
    torch.cuda.set_per_process_memory_fraction(float(os.environ["TORCH_MEM_FRACTION"]))
"""


def theirs(system: str, model: str, batch: int, seq: int, steps: int, anchors: pathlib.Path,
           fraction: float = 0.0) -> dict:
  args = f"{ANCHOR_SYSTEMS[system]} --shape {model} --batch {batch} --seq {seq} --steps {steps}"
  env = dict(os.environ)
  if fraction:
    pathlib.Path("/tmp/site").mkdir(exist_ok=True)
    pathlib.Path("/tmp/site/sitecustomize.py").write_text(CAP_HOOK)
    env["TORCH_MEM_FRACTION"] = f"{fraction:.4f}"
  with tempfile.TemporaryDirectory() as out:
    r = subprocess.run(["bash", str(anchors / "run.sh"), args], capture_output=True, text=True,
                       env=dict(env, OUT=out))
    lines = pathlib.Path(out, "anchor_fast.jsonl").read_text().splitlines() if r.returncode == 0 else []
  row = json.loads(lines[-1]) if lines else {"error": f"run.sh exit {r.returncode}: {r.stderr[-300:]}"}
  return {**row, "system": system}


def _device_bytes() -> int:
  """The first GPU's memory, from nvidia-smi (no framework is started in this process)."""
  out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, check=True).stdout
  return int(out.split()[0]) * 2**20


def _last_json(r: subprocess.CompletedProcess, system: str) -> dict:
  lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
  if r.returncode or not lines:
    return {"system": system, "error": f"exit {r.returncode}: {r.stderr[-300:]}"}
  return {**json.loads(lines[-1]), "system": system}


def table(rows: list[dict]) -> str:
  """One line a (shape, system): tokens/s, peak GiB, ours / it in speed and memory."""
  out = [f"{'shape':20} {'system':8} {'tok/s':>8} {'peak GiB':>9} {'ours/it speed':>14} {'ours/it mem':>12}"]
  for shape in dict.fromkeys(r["shape_arg"] for r in rows):
    group = [r for r in rows if r["shape_arg"] == shape]
    mine = next((r for r in group if r["system"] == "ours" and "error" not in r), None)
    for r in group:
      if "error" in r:
        out.append(f"{shape:20} {r['system']:8} error: {r['error'][:80]}")
        continue
      ratio = (f"{mine['tokens_per_s'] / r['tokens_per_s']:14.2f} {mine['peak_gib'] / r['peak_gib']:12.2f}"
               if mine and r is not mine and r.get("peak_gib") else "")
      out.append(f"{shape:20} {r['system']:8} {r['tokens_per_s']:8.0f} {r['peak_gib']:9.2f} {ratio}")
  return "\n".join(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="llama3-8b:4x2048", help="model:BATCHxSEQ, comma-separated")
  p.add_argument("--systems", default="ours,unsloth,liger,bnb")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--ours", default="", help="extra flags for bench/train_step.py")
  p.add_argument("--anchors", default=str(HERE.parent / ".anchors"))
  p.add_argument("--json", help="write the rows here")
  p.add_argument("--cap-gib", type=float, default=0.0,
                 help="cap every system's device memory (the longest-sequence comparison)")
  args = p.parse_args()
  fraction = args.cap_gib * 2**30 / _device_bytes() if args.cap_gib else 0.0
  rows = []
  for shape in args.shapes.split(","):
    model, batch, seq = _shape(shape)
    for system in args.systems.split(","):
      row = (ours(model, batch, seq, args.steps, args.ours, fraction) if system == "ours" else
             theirs(system, model, batch, seq, args.steps, pathlib.Path(args.anchors), fraction))
      rows.append({**row, "shape_arg": shape, "cap_gib": args.cap_gib})
      print(json.dumps(rows[-1]), flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
  print("\n" + table(rows))


if __name__ == "__main__":
  main()
