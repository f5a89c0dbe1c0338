"""python scripts/quality.py [--parts weights,ppl,finetune,textparity,placement,textplacement] [--seeds 0,1] ...

Checks the QLoRA paper's quality claims at small scale on the embedded SmolLM2-135M-Instruct (or,
with --model DIR, on a 16-bit transformers checkpoint such as scripts/pretrain.py's) and
writes QUALITY.md (plus quality_finetune.png and the raw numbers in quality_results.json) to
docs/quality_smollm2/, or to docs/ for a --model checkpoint (docs/QUALITY.md is the study of
scripts/pretrain.py's model), with the command that produced each table beside it:

  weights        weight MSE of NF4 / FP4 / INT4, each with and without double quantization
  ppl            perplexity of the model with each of those bases (and the bf16 reference) on text
  finetune       the same LoRA run on a bf16 base and on the NF4 + double-quant base
  textparity     the same comparison on held-out text (language modelling)
  placement      LoRA on q,v only vs on all linear layers at an equal trainable-parameter budget
  textplacement  the same comparison on held-out text

The full-precision reference is the model's weights in float32 (the embedded GGUF's are Q4_1).
A part run alone re-measures only its own table; the others are kept from the results file.
CPU is enough for SmolLM2: docs/quality_smollm2/QUALITY.md's Runtime table gives each part's time as last measured.
The measurements are in scripts/quality_parts.py, the report's text in scripts/quality_report.py
(which also re-renders a QUALITY.md alone). --render-only rewrites the report and the plot
from the results file without measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

SCRIPTS = pathlib.Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path[:0] = [str(ROOT), str(SCRIPTS)]

from qlora_jax import data as data_lib  # noqa: E402
from qlora_jax.format.quantization import QuantConfig  # noqa: E402
from qlora_jax.nn.families import LINEAR_NAMES  # noqa: E402
from qlora_jax.nn.model import ModelOptions  # noqa: E402
from qlora_jax.train.builder import build  # noqa: E402
from qlora_jax.train.config import TrainConfig  # noqa: E402
from qlora_jax.train.config_files import load_config  # noqa: E402
import quality_report  # noqa: E402
from quality_parts import (QUANTS, QV, base_model, equal_budget_ranks, finetune,  # noqa: E402
                           gaussian_control, is_linear, pydoc_text, quant_name, reference_tensors,
                           text_chunks, text_windows, weight_error, window_nll)
from quality_report import PARTS, PLOT_NAME, final_losses  # noqa: E402


# --- what every part shares ------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """What every part shares: the fine-tuning recipe, the converted folder (structure, embeddings,
  tokenizer) and the full-precision reference tensors."""

  cfg: TrainConfig
  folder: pathlib.Path
  tensors: dict[str, np.ndarray]
  tokenizer: object

  @property
  def model_config(self):
    from qlora_jax.nn.model_config import ModelConfig
    return ModelConfig.from_file(self.folder / "config.json")


def make_setup(args) -> Setup:
  """Recipe, converted folder (converted once if missing), reference tensors and tokenizer."""
  from transformers import AutoTokenizer

  from qlora_jax.io.convert import ensure_converted
  from qlora_jax.io.sources import default_gguf

  overrides = [f"steps={args.steps}"] if args.steps else []
  if args.model:  # a 16-bit checkpoint in place of the config's model, converted beside it once
    overrides += [f"model_source={args.model}", f"model_dir={args.model.rstrip('/')}.converted"]
  cfg = load_config(args.config, overrides)
  m = cfg.model
  source = str(default_gguf()) if m.model_source == "default" else m.model_source
  folder = ensure_converted(m.model_dir, m.model_source, cfg.quant)
  print(f"reference weights: {source} (dequantized to float32)")
  return Setup(cfg, folder, reference_tensors(source), AutoTokenizer.from_pretrained(str(folder)))


# --- the parts -------------------------------------------------------------------------------------

def run_weights(setup: Setup, args) -> dict:
  """Part 1a: weight error of every format on the linear weights and on the N(0, 1) control."""
  linear = [w for name, w in setup.tensors.items() if is_linear(name)]
  gauss = gaussian_control(args.gaussian_elements)
  rows = []
  for quant in tqdm(QUANTS, desc="weight error", unit="format"):
    rows.append({"name": quant_name(quant), **dataclasses.asdict(quant), **weight_error(linear, quant),
                 "gaussian_relative_mse": weight_error([gauss], quant)["relative_mse"]})
  return {"rows": rows, "tensors": len(linear), "gaussian_elements": int(gauss.size)}


def run_ppl(setup: Setup, args) -> dict:
  """Part 1b: per-window NLL of the bf16 base and of every 4-bit base on the same windows."""
  text = pydoc_text()
  ids = np.asarray(setup.tokenizer(text, add_special_tokens=False)["input_ids"])
  windows = text_windows(ids, args.ppl_windows, args.ppl_length)
  options = ModelOptions(dtype="bfloat16", scan_layers=True)
  nll = {}
  for quant in tqdm((None, *QUANTS), desc="perplexity", unit="base"):
    model = base_model(setup.folder, setup.tensors, quant, options)
    nll[quant_name(quant)] = window_nll(model, windows, args.ppl_batch, quant_name(quant)).tolist()
  return {"nll": nll, "text_chars": len(text), "text_tokens": int(len(ids)),
          "scored_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
          "python": platform.python_version()}


def _tokenized(setup: Setup):
  """(train, eval) of the recipe's dataset: the held-out split train.py makes with its seed."""
  cfg, d = setup.cfg, setup.cfg.data
  rows = data_lib.train_eval_rows(d.dataset, d.eval_dataset, d.eval_size, cfg.loop.seed)
  return [data_lib.tokenize(r, d.dataset_format, setup.tokenizer, d.source_max_len, d.target_max_len,
                            d.train_on_source) for r in rows]


def _train_runs(setup: Setup, args, variants: dict[str, tuple[TrainConfig, QuantConfig | None]],
                data=None, eval_every: int = 0) -> dict:
  """Each variant (a config and a base) fine-tuned once per seed: {variant: {seed: Curve}}, on
  `data` (train, eval) or the recipe's dataset and its held-out split."""
  train_data, eval_data = data or _tokenized(setup)
  eval_every = eval_every or args.eval_every
  runs, built = {name: {} for name in variants}, {}
  for seed in args.seeds:
    for name, (cfg, quant) in variants.items():
      cfg = cfg.replace(seed=seed)
      model = base_model(setup.folder, setup.tensors, quant, cfg.model_options(), seed=seed)
      # the variant's next seed shares the first one's optimizer and compiled steps
      built[name] = build(model, cfg.optim, reuse=built.get(name))
      curve = finetune(built[name], train_data, eval_data, cfg, eval_every, f"{name} seed {seed}")
      runs[name][str(seed)] = dataclasses.asdict(curve)
      print(f"{name} seed {seed}: eval loss {curve.eval_loss[0]:.4f} -> {curve.eval_loss[-1]:.4f} "
            f"({curve.seconds:.0f} s)")
  return {"runs": runs, "train_examples": len(train_data), "eval_examples": len(eval_data),
          "eval_target_tokens": int(sum((lab != data_lib.IGNORE).sum() for lab in eval_data.labels))}


def run_finetune(setup: Setup, args) -> dict:
  """Part 2: the recipe's LoRA run on the bf16 base and on the NF4 + DQ base, per seed."""
  cfg = setup.cfg
  return _train_runs(setup, args, {"bf16": (cfg, None), quant_name(cfg.quant): (cfg, cfg.quant)})


def _text_task(setup: Setup, args):
  """(recipe for the text task, (train rows, held-out windows), facts for the report): LoRA on the
  first 80% of the pydoc text, eval loss on windows of the last 20%."""
  ids = np.asarray(setup.tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"])
  cut = int(0.8 * len(ids))
  windows = text_windows(ids[cut:], args.text_eval_windows, args.text_length + 1)
  train = text_chunks(ids[:cut], args.text_length)
  held_out = data_lib.Tokenized([w[:-1] for w in windows], [w[1:] for w in windows], 0)
  half = args.text_length // 2
  cfg = setup.cfg.replace(steps=args.text_steps, source_max_len=half, target_max_len=args.text_length - half,
                          packing=False, group_by_length=False)
  facts = {"text_tokens": int(len(ids)), "train_tokens": int(cut), "length": args.text_length,
           "steps": args.text_steps}
  return cfg, (train, held_out), facts


def run_textparity(setup: Setup, args) -> dict:
  """Part 2b: the same comparison as part 2 on a language-modelling task with a large held-out set."""
  cfg, data, facts = _text_task(setup, args)
  out = _train_runs(setup, args, {"bf16": (cfg, None), quant_name(cfg.quant): (cfg, cfg.quant)},
                    data=data, eval_every=args.text_eval_every)
  return {**out, **facts}


def run_placement(setup: Setup, args, cfg: TrainConfig | None = None, data=None, eval_every: int = 0) -> dict:
  """Part 3: LoRA on q,v vs on all linear layers (NF4 + DQ base), equal trainable parameters, on
  the recipe's data (or `data` with `cfg`)."""
  cfg = cfg or setup.cfg
  r_qv, r_all = equal_budget_ranks(setup.model_config, QV, LINEAR_NAMES)
  scale = cfg.lora.alpha / cfg.lora.rank  # alpha / r of the recipe, kept for both ranks
  variants = {f"q,v r={r_qv}": (cfg.replace(lora_targets=QV, lora_rank=r_qv, lora_alpha=scale * r_qv), cfg.quant),
              f"all linear r={r_all}": (cfg.replace(lora_targets=LINEAR_NAMES, lora_rank=r_all,
                                                    lora_alpha=scale * r_all), cfg.quant)}
  out = _train_runs(setup, args, variants, data=data, eval_every=eval_every)
  counts = {name: {c["trainable"] for c in seeds.values()} for name, seeds in out["runs"].items()}
  assert len(set().union(*counts.values())) == 1, f"unequal trainable parameter counts: {counts}"
  return {**out, "ranks": {"qv": r_qv, "all": r_all}, "alpha_over_r": scale}


def run_textplacement(setup: Setup, args) -> dict:
  """Part 3b: part 3's comparison on part 2b's text task."""
  cfg, data, facts = _text_task(setup, args)
  return {**run_placement(setup, args, cfg, data, args.text_eval_every), **facts}


RUNNERS = {"weights": run_weights, "ppl": run_ppl, "finetune": run_finetune, "textparity": run_textparity,
           "placement": run_placement, "textplacement": run_textplacement}


# --- command line ----------------------------------------------------------------------------------

PART_ARGS = {"weights": ("config", "model", "gaussian_elements"),
             "ppl": ("config", "model", "ppl_windows", "ppl_length", "ppl_batch"),
             "finetune": ("config", "model", "steps", "seeds", "eval_every"),
             "textparity": ("config", "model", "text_steps", "seeds", "text_eval_every", "text_length",
                            "text_eval_windows"),
             "textplacement": ("config", "model", "text_steps", "seeds", "text_eval_every", "text_length",
                               "text_eval_windows"),
             "placement": ("config", "model", "steps", "seeds", "eval_every")}


def part_command(part: str, args) -> str:
  """The command that re-measures exactly one part (its table), every setting spelled out."""
  words = ["python scripts/quality.py --parts", part]
  for name in PART_ARGS[part]:
    value = getattr(args, name)
    if name in ("steps", "model") and not value:
      continue
    words += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
  return " ".join(words)


def parse(argv):
  """The command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  p.add_argument("--config", default="smollm2_135m_cpu", help="the fine-tuning recipe (configs/)")
  p.add_argument("--model", default="", help="a 16-bit transformers checkpoint to study instead of the "
                 "config's model (e.g. scripts/pretrain.py's output)")
  p.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
  p.add_argument("--seeds", default="0,1", help="training seeds (LoRA init, data order, dropout)")
  p.add_argument("--eval-every", type=int, default=5, help="eval-loss points of the curves")
  p.add_argument("--text-steps", type=int, default=100, help="part 2b: LoRA steps on the text")
  p.add_argument("--text-eval-every", type=int, default=20, help="part 2b: eval-loss points")
  p.add_argument("--text-length", type=int, default=256, help="part 2b: tokens per training row")
  p.add_argument("--text-eval-windows", type=int, default=48, help="part 2b: held-out windows")
  p.add_argument("--ppl-windows", type=int, default=64, help="perplexity windows")
  p.add_argument("--ppl-length", type=int, default=512, help="tokens per perplexity window")
  p.add_argument("--ppl-batch", type=int, default=4, help="windows per forward pass")
  p.add_argument("--gaussian-elements", type=int, default=576 * 8192, help="size of the N(0,1) control")
  p.add_argument("--out-dir", help="where QUALITY.md and its files go (default: docs/ for a --model "
                 "checkpoint, docs/quality_smollm2/ for the embedded SmolLM2)")
  p.add_argument("--render-only", action="store_true",
                 help="measure nothing: rewrite QUALITY.md and the plot from quality_results.json")
  args = p.parse_args(argv)
  args.parts = [x for x in args.parts.split(",") if x]
  unknown = set(args.parts) - set(PARTS)
  if unknown:
    p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  return args


# --- results, plot, report -------------------------------------------------------------------------

def recipe(cfg: TrainConfig) -> dict:
  """The config as the results file records it: flat keys (lora_rank, learning_rate, ...), as
  `key=value` overrides name them, and max_seq_len."""
  return {**cfg.to_flat_dict(), "max_seq_len": cfg.data.max_seq_len}


def _meta(args, setup: Setup, setup_seconds: float, model: dict) -> dict:
  cores = len(os.sched_getaffinity(0))
  return {"machine": f"{platform.machine()}, {cores} CPU cores", "jax": jax.__version__,
          "backend": jax.default_backend(), "config": args.config, "recipe": recipe(setup.cfg),
          "linear_params": int(sum(w.size for n, w in setup.tensors.items() if is_linear(n))),
          "params": int(sum(w.size for w in setup.tensors.values())),
          "model": model, "setup_seconds": setup_seconds}


def _model_facts(model: str) -> dict:
  """What the report says about the model: the embedded GGUF, or a 16-bit checkpoint (with
  scripts/pretrain.py's log when it made it)."""
  if not model:
    return {"kind": "gguf"}
  log_path = pathlib.Path(model) / "pretrain_log.json"
  if not log_path.is_file():
    return {"kind": "checkpoint", "path": model}
  log = json.loads(log_path.read_text())
  return {"kind": "pretrained", "path": model, "size": log["size"], "parameters": log["parameters"],
          "tokens": len(log["train"]) * log["batch"] * log["seq"], "batch": log["batch"], "seq": log["seq"],
          "lr": log["lr"], "steps": log["steps"], "stopped_at_step": log.get("stopped_at_step"),
          "seed": log.get("seed", 0),  # logs before the seed was recorded ran the default, 0
          "device": log["device"],
          "minutes": log.get("seconds", 0) / 60, "held_out_loss": log["eval"][-1][1] if log["eval"] else None,
          "corpus": {k: log["corpus"].get(k) for k in ("train_tokens", "val_tokens", "train_files", "val_files")},
          "pydoc_in_corpus": "pydoc topics" in log["corpus"].get("roots", [])}


def _summary(results: dict, parts: list[str]) -> str:
  lines = []
  if "ppl" in parts:
    nll = results["ppl"]["nll"]
    lines.append("perplexity: " + ", ".join(f"{k} {math.exp(np.mean(v)):.3f}" for k, v in nll.items()))
  for part in ("finetune", "textparity", "placement", "textplacement"):
    if part in parts:
      lines.append(f"{part} final eval loss: " + ", ".join(
          f"{k} {np.mean(v):.4f}" for k, v in final_losses(results[part]["runs"]).items()))
  return "\n".join(lines)


def plot_runs(results: dict, out: pathlib.Path) -> None:
  """Eval loss (markers: mean over seeds; thin: each seed) and train loss (faint) per step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(p, t) for p, t in (("finetune", "bf16 base vs NF4 + DQ base (same LoRA run)"),
                                ("textparity", "the same on held-out text (language modelling)"),
                                ("placement", "LoRA placement at equal trainable parameters"),
                                ("textplacement", "the same on held-out text"))
            if p in results]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
  for ax, (part, title) in zip(axes[0], panels):
    for color, (name, seeds) in zip(("C0", "C3", "C2", "C1"), results[part]["runs"].items()):
      curves = list(seeds.values())
      steps = curves[0]["eval_steps"]
      for c in curves:
        ax.plot(steps, c["eval_loss"], color=color, lw=0.7, alpha=0.5)
        ax.plot(range(1, len(c["train_loss"]) + 1), c["train_loss"], color=color, lw=0.5, alpha=0.2)
      ax.plot(steps, np.mean([c["eval_loss"] for c in curves], axis=0), "o-", color=color, lw=1.8,
              ms=4, label=f"{name}: eval (mean of {len(curves)} seeds)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.text(0.01, 0.01, "thin lines: individual seeds (eval); faint: train loss per step", fontsize=7)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(out, dpi=120)
  plt.close(fig)


def write_report(results: dict, out_dir: pathlib.Path) -> None:
  """The fine-tuning plot and QUALITY.md (quality_report.render) from the results."""
  if "finetune" in results or "placement" in results:
    plot_runs(results, out_dir / PLOT_NAME)
  quality_report.write(results, out_dir / "QUALITY.md", PLOT_NAME)


def main(argv=None) -> int:
  """Measure the chosen parts, merge them into the results file, rewrite the report."""
  args = parse(argv)
  out_dir = pathlib.Path(args.out_dir or ROOT / "docs" / ("" if args.model else "quality_smollm2"))
  out_dir.mkdir(parents=True, exist_ok=True)
  results_path = out_dir / "quality_results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else {}
  if args.render_only:
    write_report(results, out_dir)
    print(f"wrote {out_dir / 'QUALITY.md'} from {results_path}")
    return 0
  kept = sorted(part for part in results if part != "meta" and part not in args.parts)
  old, new = results.get("meta", {}).get("model"), _model_facts(args.model)
  if kept and old is not None and (old.get("kind"), old.get("path")) != (new["kind"], new.get("path")):
    raise SystemExit(f"{results_path} holds results of another model ({old.get('path') or old['kind']}) for "
                     f"{', '.join(kept)}; re-run every part with --parts, or choose another --out-dir "
                     "(nothing was changed)")
  start = time.time()
  setup = make_setup(args)
  results["meta"] = _meta(args, setup, time.time() - start, new)
  for part in args.parts:
    t0, cpu0 = time.time(), time.process_time()
    results[part] = RUNNERS[part](setup, args)
    results[part].update(command=part_command(part, args), seconds=time.time() - t0,
                         cpu_seconds=time.process_time() - cpu0)
    results_path.write_text(json.dumps(results, indent=1))  # a crash later keeps this part
  write_report(results, out_dir)
  print(_summary(results, args.parts))
  print(f"wrote {out_dir / 'QUALITY.md'} in {(time.time() - start) / 60:.1f} min")
  return 0


if __name__ == "__main__":
  sys.exit(main())
