"""The measurements behind scripts/quality.py: bases built from reference weights, weight error,
per-window NLL, and the curves of LoRA runs on what the library's builder (train/builder.py)
made trainable. quality.py runs them as the report's parts.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from qlora_jax import data as data_lib
from qlora_jax.format.quantization import QuantConfig, dequantize, quantize
from qlora_jax.io.loading import load_model
from qlora_jax.io.sources import open_source
from qlora_jax.nn.families import LINEAR_NAMES
from qlora_jax.nn.model import ModelOptions, variable_names
from qlora_jax.nn.variables import QuantWeight
from qlora_jax.train.builder import Trainable
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.loss import chunked_cross_entropy

QUANTS = tuple(QuantConfig(quant_type=t, double_quant=dq) for t in ("nf4", "fp4", "int4") for dq in (True, False))
LINEAR_SUFFIXES = tuple(f"{n}.weight" for n in LINEAR_NAMES)
QV = ("q_proj", "v_proj")


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
  frozen weight as it is, pallas_kernels.xla.frozen_weight); otherwise
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


def text_chunks(ids: np.ndarray, length: int) -> data_lib.Tokenized:
  """Consecutive non-overlapping chunks of length + 1 tokens as (inputs, next-token labels)."""
  rows = [ids[i:i + length + 1] for i in range(0, len(ids) - length, length)]
  return data_lib.Tokenized([r[:-1].astype(np.int32) for r in rows], [r[1:].astype(np.int32) for r in rows], 0)


# --- 2-3. fine-tuning ------------------------------------------------------------------------------

@dataclasses.dataclass
class Curve:
  """One fine-tuning run: eval loss at each evaluation step, train loss at every step."""

  eval_steps: list[int]
  eval_loss: list[float]
  train_loss: list[float]
  trainable: int
  seconds: float


def finetune(trainable: Trainable, train_data: data_lib.Tokenized, eval_data: data_lib.Tokenized,
             cfg: TrainConfig, eval_every: int, desc: str = "") -> Curve:
  """cfg's LoRA steps on a model made trainable by the library's builder (train.builder.build:
  optimizer, its state and the jitted steps), the data order seeded by cfg's seed (LoRA init and
  dropout come with the model); eval loss over the whole eval set before training and every
  eval_every steps."""
  start = time.time()
  optim, d = cfg.optim, cfg.data
  batches = data_lib.Batches(train_data, optim.batch_size, d.max_seq_len, seed=cfg.loop.seed,
                             packing=d.packing, group_by_length=d.group_by_length)
  eval_set = [trainable.put_batch(b) for b in data_lib.eval_batches(eval_data, optim.batch_size, d.max_seq_len)]

  curve = Curve([0], [trainable.mean_loss(eval_set)], [], sum(x.size for x in jax.tree.leaves(trainable.lora)), 0.0)
  for step in tqdm(range(1, optim.steps + 1), desc=desc, unit="step", leave=False):
    metrics = trainable.train_step(trainable.put_batch(batches.next_accumulated(optim.grad_accum)))
    curve.train_loss.append(float(metrics["loss"]))
    if step % eval_every == 0 or step == optim.steps:
      curve.eval_steps.append(step)
      curve.eval_loss.append(trainable.mean_loss(eval_set))
  curve.seconds = time.time() - start
  return curve


def lora_params_per_layer(config, targets: tuple[str, ...], rank: int) -> int:
  """Trainable LoRA parameters of one decoder layer: rank * (in + out) per targeted linear."""
  return sum(rank * sum(config.linear_shapes[t]) for t in targets)


def equal_budget_ranks(config, few: tuple[str, ...], many: tuple[str, ...]) -> tuple[int, int]:
  """The smallest ranks (r_few, r_many) giving LoRA on `few` and on `many` exactly equal
  trainable-parameter counts."""
  per_few, per_many = (lora_params_per_layer(config, t, 1) for t in (few, many))
  g = math.gcd(per_few, per_many)
  return per_many // g, per_few // g
