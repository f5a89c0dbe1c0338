"""A model from a converted folder (format/folder.py): `load_model` builds it abstractly, fills
each base variable from its stored tensors (shape-checked, straight into its devices' layout) and
initialises the adapters as PEFT does."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.format.bnb_format import SIDE_KEY, from_bnb_state
from qlora_jax.format.folder import TensorIndex, read_meta
from qlora_jax.format.quantization import QuantConfig
from qlora_jax.nn.families import ignored
from qlora_jax.nn.lora import lora_a_init
from qlora_jax.nn.model import CausalLM, ModelOptions, variable_names
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.moe import RouterStats
from qlora_jax.nn.variables import FrozenParam, QuantWeight


def expected_tensors(config: ModelConfig, quant: QuantConfig = QuantConfig()) -> dict[str, tuple[str, tuple]]:
  """name -> (kind, shape) of every tensor the model needs, read off the model itself."""
  abstract = nnx.eval_shape(lambda: CausalLM(config, ModelOptions(quant=quant), rngs=nnx.Rngs(0)))
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Any(QuantWeight, FrozenParam))):
    name = ".".join(str(p) for p in path)
    value = var.get_value()
    out[name] = ("quantized", value.shape) if isinstance(var, QuantWeight) else ("dense", value.shape)
  return out


def load_model(path, dtype=jnp.bfloat16, options: ModelOptions | None = None, *, seed: int = 0,
               tokenizer: bool = True, layout=None):
  """(model, tokenizer) from a converted folder.

  Args:
    path: the folder convert_weights.py wrote.
    dtype: compute dtype and dtype of the dense weights (embeddings, norms, lm_head).
    options: model options (LoRA, remat, ...); its dtype and quant are taken from `dtype` and
      the checkpoint. Default: no adapters.
    seed: initialises the LoRA adapters (A random, B zero), if any.
    layout: a sharding.Layout: each variable goes straight to its devices, split as the layout
      says (stacked on the host first, so no device ever holds a whole stacked weight).
  """
  folder = pathlib.Path(path)
  meta = read_meta(folder)
  config = ModelConfig.from_file(folder / "config.json")
  options = dataclasses.replace(options or ModelOptions(), dtype=jnp.dtype(dtype).name,
                                quant=QuantConfig(**meta["quant"]))
  model = _build(config, options, TensorIndex.from_folder(folder), seed, layout)
  tok = None
  if tokenizer:
    if not meta.get("tokenizer", True):
      raise ValueError(f"{folder} was converted from a source without a tokenizer; copy the "
                       "tokenizer files into it (or pass tokenizer=False)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
  return model, tok


def _build(config: ModelConfig, options: ModelOptions, tensors: TensorIndex, seed: int,
           layout=None) -> CausalLM:
  """The model with base weights from `tensors` and freshly initialised adapters."""
  make = lambda: CausalLM(config, options, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, base, rest = nnx.split(nnx.eval_shape(make), nnx.Any(QuantWeight, FrozenParam), ...)
  place = placer(layout, base)
  used = set()
  for path, var in nnx.to_flat_state(base):
    names = variable_names(path, config, options)
    # Each layer is read on the host, the stack goes to its device(s) in one transfer.
    values = [_load_one(tensors, name, var, i is not None, jnp.dtype(options.dtype), used)
              for name, i in names]
    value = values[0] if names[0][1] is None else _stack(values)
    var.set_value(place(path, value))
  leftovers = sorted(k for k in tensors if _owner(k) not in used and not ignored(k))
  if leftovers:
    raise ValueError(f"checkpoint tensors the model has no place for: {leftovers[:8]}"
                     f"{' ...' if len(leftovers) > 8 else ''} (config.json does not match the weights?)")
  return nnx.merge(graphdef, base, init_trainable(rest, seed, placer(layout, rest)))


def _stack(values: list):
  """Per-layer host values (arrays or QuantizedArrays) as one with a leading layer axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *values)


def placer(layout, abstract: nnx.State):
  """place(path, value): the value on its devices as the layout splits that variable (as it is
  without a layout)."""
  if layout is None:
    return lambda path, value: jax.device_put(value)
  variables = dict(nnx.to_flat_state(abstract))
  return lambda path, value: jax.device_put(value, layout.value_shardings(variables[path], path, value))


def init_trainable(rest: nnx.State, seed: int, place=lambda path, value: value) -> nnx.State:
  """Adapters (A as PEFT initialises it, B = 0) and one dropout RNG stream per layer, filled
  into the abstract state directly: no compile of the whole model's constructor. Variables of
  stacked layers ([L, ...]) get one independent draw per layer."""
  lora_key, rng_key = jax.random.split(jax.random.key(seed))
  for i, (path, var) in enumerate(nnx.to_flat_state(rest)):
    spec = var.get_value()
    if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_a":
      in_features, rank = spec.shape[-2:]
      keys = jax.random.split(jax.random.fold_in(lora_key, i), math.prod(spec.shape[:-2]))
      value = jax.vmap(lambda k: lora_a_init(k, in_features, rank, spec.dtype))(keys).reshape(spec.shape)
    elif isinstance(var, (nnx.LoRAParam, nnx.RngCount, RouterStats)):  # B = 0, counts, statistics
      value = jnp.zeros(spec.shape, spec.dtype)
    elif isinstance(var, nnx.RngKey):
      value = jax.random.split(jax.random.fold_in(rng_key, i), math.prod(spec.shape)).reshape(spec.shape)
    else:
      raise ValueError(f"cannot initialise {'.'.join(map(str, path))} ({type(var).__name__})")
    var.set_value(place(path, value))
  return rest



def _owner(key: str) -> str:
  """The variable a stored key belongs to (bnb side tensors belong to their weight)."""
  return SIDE_KEY.sub("", key)


def _load_one(tensors: Mapping, name: str, var, stacked: bool, dtype, used: set):
  """One stored tensor for (one layer of) a variable, shape-checked."""
  spec = var.get_value()
  if isinstance(var, QuantWeight):
    shape = spec.shape  # a QuantizedArray's static shape is per layer
  else:
    shape = spec.shape[1:] if stacked else spec.shape
  if name not in tensors:
    raise ValueError(f"checkpoint is missing tensor {name!r} (shape {tuple(shape)})")
  used.add(name)
  value = from_bnb_state(tensors, name, on_host=True) if isinstance(var, QuantWeight) else tensors[name]
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(shape)}")
  return value if isinstance(var, QuantWeight) else np.asarray(value).astype(dtype)
