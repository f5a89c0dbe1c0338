"""python -m qlora_jax.chat MODEL [--adapter RUN_OR_PEFT_DIR] [--prompt TEXT]

Chat with a converted model through its chat template, tokens streamed to the terminal.
Without --prompt it reads messages from stdin until an empty line or EOF.
"""

from __future__ import annotations

import argparse
import sys


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="a folder written by convert_weights.py")
  p.add_argument("--adapter", help="a training run folder or a PEFT adapter folder")
  p.add_argument("--prompt", help="answer this one message and exit")
  p.add_argument("--system", help="system message")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def chat(args) -> None:
  from qlora_jax.nn.generate import SamplingConfig, complete
  from qlora_jax.io.loading import load_model

  sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
  if args.adapter:
    from qlora_jax.export import load_adapter
    model, tokenizer = load_adapter(args.model, args.adapter)
  else:
    model, tokenizer = load_model(args.model)
  messages = [{"role": "system", "content": args.system}] if args.system else []
  prompts = [args.prompt] if args.prompt is not None else _stdin_prompts()
  for text in prompts:
    messages.append({"role": "user", "content": text})
    answer = complete(model, tokenizer, messages, sampling, on_text=lambda s: print(s, end="", flush=True))
    print()
    messages.append({"role": "assistant", "content": answer})


def main(argv=None) -> int:
  from qlora_jax.cli import run

  args = parse(argv)
  return run(lambda: chat(args))


def _stdin_prompts():
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print("> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
      return
    yield line.strip()


if __name__ == "__main__":
  sys.exit(main())
