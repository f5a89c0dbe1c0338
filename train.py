"""python train.py [--config NAME_OR_PATH] [--resume | --no-resume] [key=value ...]

Fine-tunes LoRA adapters on a 4-bit base model. NAME resolves inside configs/ (default:
smollm2_135m_cpu, the embedded SmolLM2 on the shipped demo data, a few minutes on a laptop CPU).
A run folder that holds a checkpoint resumes automatically.
"""

import argparse
import sys


def parse(argv):
  from qlora_jax.train.config_files import help_text

  p = argparse.ArgumentParser(description=__doc__, epilog=help_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="smollm2_135m_cpu", help="config name in configs/ or a path")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--resume", dest="resume", action="store_true", default=None,
                     help="require a checkpoint in output_dir and continue from it")
  group.add_argument("--no-resume", dest="resume", action="store_false",
                     help="require output_dir to hold no checkpoint")
  p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields")
  return p.parse_intermixed_args(argv)


def train_from_args(args) -> str:
  from qlora_jax.train.config_files import load_config
  from qlora_jax.train.trainer import train

  cfg = load_config(args.config, args.overrides)
  summary = train(cfg, resume=args.resume)  # a NaN loss raises TrainingError, a ValueError
  return (f"{summary.text()}\nrun folder: {cfg.loop.output_dir} (config.json, metrics.jsonl, "
          "loss.png, summary.txt, checkpoints/)")


def main(argv=None) -> int:
  from qlora_jax.cli import run

  args = parse(argv)
  return run(lambda: train_from_args(args))


if __name__ == "__main__":
  sys.exit(main())
