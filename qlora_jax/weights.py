"""The converted-model folder: its key table, sharded safetensors I/O, and `load_model`.

A converted folder holds
  config.json                      the transformers config (plus quantization_config with --export-bnb)
  qlora_jax.json                   {"format_version", "quant": {...}, "dense_dtype", "source", ...}
  model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer files                  as `AutoTokenizer.save_pretrained` writes them
Tensor keys are transformers' names. The 4-bit linear weights use bitsandbytes' layout (the
packed codes under `<name>`, plus `<name>.absmax`, `.quant_map`, `.nested_absmax`,
`.nested_quant_map`, `.quant_state.bitsandbytes__<type>`); everything else is dense.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from qlora_jax.bnb_format import SIDE_KEY, from_bnb_state
from qlora_jax.lora import lora_a_init
from qlora_jax.model import CausalLM, ModelOptions, variable_names
from qlora_jax.model_config import ModelConfig
from qlora_jax.quantization import QuantConfig, QuantizedArray, zeros_quantized
from qlora_jax.variables import FrozenParam, QuantWeight

FORMAT_VERSION = 1
META_FILE = "qlora_jax.json"
INDEX_FILE = "model.safetensors.index.json"

# Canonical (transformers) tensor names of the Llama family -> how they are stored.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "dense"),
    (r"model\.norm\.weight", "dense"),
    (r"lm_head\.weight", "dense"),
    (r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", "dense"),
    (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight", "quantized"),
    (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias", "dense"),
    (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", "quantized"),
    (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.bias", "dense"),
)
# Buffers some checkpoints carry that are recomputed rather than loaded.
IGNORED_KEYS = (r".*\.rotary_emb\.inv_freq",)


def classify(name: str) -> str:
  """'quantized' | 'dense' | 'ignored' for a tensor name; ValueError for anything else."""
  if _ignored(name):
    return "ignored"
  for pattern, kind in KEY_TABLE:
    if re.fullmatch(pattern, name):
      return kind
  raise ValueError(f"unexpected tensor {name!r}: not part of a Llama/Mistral/Qwen2 decoder")


def expected_tensors(config: ModelConfig, quant: QuantConfig = QuantConfig()) -> dict[str, tuple[str, tuple]]:
  """name -> (kind, shape) of every tensor the model needs, read off the model itself."""
  abstract = nnx.eval_shape(lambda: CausalLM(config, ModelOptions(quant=quant), rngs=nnx.Rngs(0)))
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Any(QuantWeight, FrozenParam))):
    name = ".".join(str(p) for p in path)
    value = var.get_value()
    out[name] = ("quantized", value.shape) if isinstance(var, QuantWeight) else ("dense", value.shape)
  return out


class TensorIndex(Mapping):
  """Read-only name -> numpy array over one or several safetensors files, loaded on access."""

  def __init__(self, files: dict[str, pathlib.Path]):
    self._files = files  # tensor name -> file

  @classmethod
  def from_folder(cls, folder: pathlib.Path) -> "TensorIndex":
    folder = pathlib.Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = {k: folder / f for k, f in weight_map.items()}
      missing = sorted({str(f) for f in files.values() if not f.is_file()})
      if missing:
        raise ValueError(f"{index} names shard files that do not exist: {missing}")
      return cls(files)
    single = folder / "model.safetensors"
    if single.is_file():
      with safe_open(str(single), "numpy") as f:
        return cls({k: single for k in f.keys()})
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
      raise ValueError(f"{folder} has only pickle-based weights (.bin/.pt), which are never loaded "
                       "(unsafe); save the model with safetensors first")
    raise ValueError(f"no model.safetensors or {INDEX_FILE} in {folder}")

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._files:
      raise KeyError(name)
    try:
      with safe_open(str(self._files[name]), "numpy") as f:
        return f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
      raise ValueError(f"cannot read tensor {name!r} from {self._files[name]}: {e}") from e

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


class ShardWriter:
  """Streams tensors into safetensors shards of at most `max_bytes` each (plus an index)."""

  def __init__(self, folder: pathlib.Path, max_bytes: int = 2 << 30):
    self.folder, self.max_bytes = pathlib.Path(folder), max_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []
    self.total_bytes = 0

  def add(self, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if self._pending and self._pending_bytes + array.nbytes > self.max_bytes:
      self._flush()
    self._pending[name] = array
    self._pending_bytes += array.nbytes
    self.total_bytes += array.nbytes

  def _flush(self) -> None:
    save_file(self._pending, str(self.folder / f"shard-{len(self._shards):05d}.tmp"),
              metadata={"format": "pt"})  # "pt": transformers refuses safetensors without it
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> None:
    """Write the last shard and give the shards their final names (and the index)."""
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
      os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / name)
    if n > 1:
      weight_map = {k: names[i] for i, keys in enumerate(self._shards) for k in keys}
      (self.folder / INDEX_FILE).write_text(json.dumps(
          {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1))


def read_meta(folder: pathlib.Path) -> dict:
  path = pathlib.Path(folder) / META_FILE
  if not path.is_file():
    raise ValueError(f"{folder} is not a converted model folder (no {META_FILE}); "
                     "create one with: python convert_weights.py SRC OUT")
  meta = json.loads(path.read_text())
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}; "
                     "re-convert the model with this version of convert_weights.py")
  return meta


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
  place = _placer(layout, base)
  used = set()
  for path, var in nnx.to_flat_state(base):
    names = variable_names(path, config, options)
    # Each layer is read on the host, the stack goes to its device(s) in one transfer.
    values = [_load_one(tensors, name, var, i is not None, jnp.dtype(options.dtype), used)
              for name, i in names]
    value = values[0] if names[0][1] is None else _stack(values)
    var.set_value(place(path, value))
  leftovers = sorted(k for k in tensors if _owner(k) not in used and not _ignored(k))
  if leftovers:
    raise ValueError(f"checkpoint tensors the model has no place for: {leftovers[:8]}"
                     f"{' ...' if len(leftovers) > 8 else ''} (config.json does not match the weights?)")
  return nnx.merge(graphdef, base, _init_trainable(rest, seed, _placer(layout, rest)))


def _stack(values: list):
  """Per-layer host values (arrays or QuantizedArrays) as one with a leading layer axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *values)


def _placer(layout, abstract: nnx.State):
  """place(path, value): the value on its devices as the layout splits that variable (as it is
  without a layout)."""
  if layout is None:
    return lambda path, value: jax.device_put(value)
  variables = dict(nnx.to_flat_state(abstract))
  return lambda path, value: jax.device_put(value, layout.value_shardings(variables[path], path, value))


def _init_trainable(rest: nnx.State, seed: int, place=lambda path, value: value) -> nnx.State:
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
    elif isinstance(var, (nnx.LoRAParam, nnx.RngCount)):
      value = jnp.zeros(spec.shape, spec.dtype)
    elif isinstance(var, nnx.RngKey):
      value = jax.random.split(jax.random.fold_in(rng_key, i), math.prod(spec.shape)).reshape(spec.shape)
    else:
      raise ValueError(f"cannot initialise {'.'.join(map(str, path))} ({type(var).__name__})")
    var.set_value(place(path, value))
  return rest


def _ignored(name: str) -> bool:
  return any(re.fullmatch(p, name) for p in IGNORED_KEYS)


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


def random_quantized(key: jax.Array, shape: tuple[int, ...], quant: QuantConfig) -> QuantizedArray:
  """A random 4-bit tensor made directly in quantized form (no full-precision weight ever exists):
  uniform codes, scales near 0.025 (the magnitude of a trained Llama weight block's absmax)."""
  like = zeros_quantized(shape, quant)
  k1, k2 = jax.random.split(key)
  codes = jax.random.bits(k1, like.codes.shape, jnp.uint8)
  if quant.double_quant:  # codes of the upper half of the dynamic map: absmax = 0.02 + 0.01 * q
    absmax = jax.random.randint(k2, like.absmax.shape, 160, 256).astype(jnp.uint8)
    return like.replace(codes=codes, absmax=absmax, nested_absmax=jnp.full_like(like.nested_absmax, 0.01),
                        offset=jnp.float32(0.02))
  return like.replace(codes=codes, absmax=jax.random.uniform(k2, like.absmax.shape, jnp.float32, 0.02, 0.03))


def random_model(config: ModelConfig, options: ModelOptions, seed: int = 0, layout=None) -> CausalLM:
  """A model with random base weights, 4-bit from the start, each variable made by one jitted
  call straight into its layout (on the default device without one)."""
  make = lambda: CausalLM(config, options, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, base, rest = nnx.split(nnx.eval_shape(make), nnx.Any(QuantWeight, FrozenParam), ...)
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(base)):
    spec, k = var.get_raw_value(), jax.random.fold_in(key, i)
    if isinstance(var, QuantWeight):
      layers = [n for _, n in variable_names(path, config, options)]
      # layer j from fold_in(k, j), vmapped over the layers of a stacked weight
      one = lambda k, j, shape=spec.shape: random_quantized(jax.random.fold_in(k, j), shape, options.quant)  # noqa: E731
      fn = (lambda k, one=one: one(k, 0)) if layers[0] is None else (
          lambda k, one=one, n=len(layers): jax.vmap(one, in_axes=(None, 0))(k, jnp.arange(n)))
    elif path[-2].endswith("norm"):
      fn = lambda k, spec=spec: jnp.ones(spec.shape, spec.dtype)  # noqa: E731
    else:
      fn = lambda k, spec=spec: (0.02 * jax.random.normal(k, spec.shape, jnp.float32)).astype(spec.dtype)  # noqa: E731
    out = None if layout is None else layout.value_shardings(var, path, jax.eval_shape(fn, k))
    var.set_value(jax.jit(fn, out_shardings=out)(k))
  return nnx.merge(graphdef, base, _init_trainable(rest, seed, _placer(layout, rest)))
