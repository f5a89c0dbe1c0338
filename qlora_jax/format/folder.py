"""The converted-model folder format, on disk.

A converted folder holds
  config.json                      the transformers config (plus quantization_config with --export-bnb)
  qlora_jax.json                   {"format_version", "quant": {...}, "dense_dtype", "source", ...}
  model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer files                  as `AutoTokenizer.save_pretrained` writes them
Tensor keys are transformers' names. The 4-bit linear weights use bitsandbytes' layout (the
packed codes under `<name>`, plus `<name>.absmax`, `.quant_map`, `.nested_absmax`,
`.nested_quant_map`, `.quant_state.bitsandbytes__<type>`); everything else is dense. This module
reads and writes such folders' tensors and metadata; io/convert.py makes them, io/loading.py
builds a model from one.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT_VERSION = 1
META_FILE = "qlora_jax.json"
INDEX_FILE = "model.safetensors.index.json"


def _keys(path: pathlib.Path) -> list[str]:
  """The tensor names of a safetensors file; ValueError when its header cannot be read."""
  try:
    with safe_open(str(path), "numpy") as f:
      return list(f.keys())
  except Exception as e:  # safetensors' own error types: truncated header, not safetensors
    raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or "
                     "damaged: convert the model again into a new folder") from None


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
      return cls({k: single for k in _keys(single)})
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
      raise ValueError(f"cannot read tensor {name!r} from {self._files[name]} ({e}); the file is "
                       "damaged: convert the model again into a new folder") from None

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
